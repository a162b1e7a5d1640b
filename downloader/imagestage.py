"""The fetcher's step between a complete, sniffed body and its commit (dataset output).

Two optional jobs, both off by default: re-encode the image (image.*, see
``transform.py``) and drop content already stored (dedupe.content, see
``contentindex.py``). The decode, resize, encode and pHash run in the process's
image threads; the content table's short transactions run there too, so the
event loop never waits on SQLite's lock. Workers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from downloader.contentindex import BUSY, CONTENT_DB, ContentIndex, Match
from downloader.outcomes import Outcome
from downloader.packer import content_db_beside, sample_exists
from downloader.settings import Settings
from downloader.storage import Part, Store
from downloader.transform import Processed, Transform, pool, process
from downloader.validate import ImageType

#: How long a download waits before asking again about a copy being stored elsewhere.
_BUSY_POLL_SECONDS = (0.01, 0.05, 0.2)


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    """What will be stored for one image: its part (re-encoded or as downloaded)."""

    part: Part
    image: ImageType
    processed: Processed | None = None

    @property
    def phash(self) -> int | None:
        return self.processed.phash if self.processed is not None else None

    @property
    def sha256(self) -> str | None:
        """Of the re-encoded bytes; None when the downloaded ones are stored."""
        if self.processed is None or self.processed.body is None:
            return None
        return hashlib.sha256(self.processed.body).hexdigest()

    def describe(self, saved: Outcome) -> Outcome:
        """The saved record of a re-encoded image: what was stored, and the original's
        size, bytes and sha256 beside it."""
        made = self.processed
        if made is None or made.body is None:
            return saved
        return dataclasses.replace(
            saved,
            bytes=len(made.body),
            sha256=self.sha256,
            content_type=made.image.mime,
            width=made.width,
            height=made.height,
            original_width=made.original_width,
            original_height=made.original_height,
            original_bytes=saved.bytes,
            original_sha256=saved.sha256,
        )


class ImageStage:
    def __init__(
        self, settings: Settings, transform: Transform | None, index: ContentIndex | None
    ) -> None:
        self.transform = transform
        self.index = index
        self._pool = pool(settings.image.workers)

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, func, *args)

    async def restage(
        self, stem: str, body: bytes | None, part: Part, image: ImageType, store: Store
    ) -> Stored:
        """Re-encode and/or hash the image (raises InvalidImage). A re-encoded image
        gets a part of its own and the downloaded one is removed. ``body``: the whole
        body if held, else it is read from ``part``."""
        if self.transform is None or not self.transform.applies_to(image):
            return Stored(part, image)
        if body is None:
            await part.close()
        source = body if body is not None else part.path
        made = await self._run(process, source, image, self.transform)
        assert isinstance(made, Processed)
        if made.body is None:
            return Stored(part, image, made)
        await part.abort()
        return Stored(store.write_part(stem, made.body), made.image, made)

    async def claim(self, sha256: str, phash: int | None, path: str, owner: str) -> Match | None:
        """None: store it (and confirm or release after); a Match: a copy is stored."""
        if self.index is None:
            return None
        waits = 0
        while True:
            found = await self._claim_once(sha256, phash, path, owner)
            if found is not BUSY:
                assert found is None or isinstance(found, Match)
                return found
            await asyncio.sleep(_BUSY_POLL_SECONDS[min(waits, len(_BUSY_POLL_SECONDS) - 1)])
            waits += 1

    async def _claim_once(self, sha256: str, phash: int | None, path: str, owner: str) -> Any:
        """One claim; if this download is cancelled while the claim runs, a claim that
        went through is released, not left to block the other copies."""
        assert self.index is not None
        index = self.index
        task = asyncio.ensure_future(self._run(index.claim, sha256, phash, path, owner))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:

            def undo(done: asyncio.Future[Any]) -> None:
                with contextlib.suppress(BaseException):
                    if done.result() is None:
                        self._pool.submit(index.release, sha256)

            task.add_done_callback(undo)
            raise

    async def confirm(self, sha256: str, path: str) -> None:
        if self.index is not None:
            await self._run(self.index.confirm, sha256, path)

    async def release(self, sha256: str) -> None:
        if self.index is not None:
            await self._run(self.index.release, sha256)

    async def replaced(self, path: str) -> None:
        """The file at ``path`` now holds other bytes (--revalidate): no copy may point at
        it for the bytes it held before."""
        if self.index is not None:
            await self._run(self.index.forget_path, path)


_stage: ImageStage | None = None


def process_stage(settings: Settings, outdir: Path, local: bool) -> ImageStage | None:
    """This process's stage (one content connection, one thread pool), None when both
    jobs are off. ``local``: the images are files in ``outdir`` (else in an object
    store, whose listing is not kept up to date in the run: a confirmed row is
    trusted)."""
    global _stage
    transform = Transform.from_settings(settings)
    dedupe = settings.dedupe
    if transform is None and dedupe.content == "off":
        return None
    if _stage is None:
        index = None
        if dedupe.content != "off":
            near = dedupe.max_distance if dedupe.content == "perceptual" else None
            if settings.output.format == "files":
                db, exists = outdir / CONTENT_DB, exists_in(outdir, local)
            else:  # outdir is the staging folder of a dataset format
                db, exists = content_db_beside(outdir), sample_exists(outdir)
            index = ContentIndex(db, near, exists)
        _stage = ImageStage(settings, transform, index)
    return _stage


def exists_in(outdir: Path, local: bool) -> Callable[[str], bool]:
    """``exists(relpath)`` for a content index of images in ``outdir``."""
    if not local:
        return lambda relpath: True
    return lambda relpath: os.path.isfile(os.path.join(outdir, relpath))
