"""The workers' side of an s3:// output: images become objects under the prefix.

:class:`ObjectStore` keeps :class:`storage.Store`'s interface, so the fetcher does
not know where bytes go. The object key is the prefix plus the name the local
store would use. Invariant 2 in object-store terms: an object exists only once
complete. A body held in memory goes up in one PUT; a larger one is spooled to a
local part file (the state folder's ``.imgdl/parts/``) and goes up from there, as
a multipart upload above ``s3.part_size`` (the object appears when S3 completes
the upload, not before). The upload is awaited inside ``commit``, so the outcome
``saved``, and the journal line after it, come only after the store said yes; a
refused or failed upload is ``upload_error``. Imported by workers only, and only
for an s3:// output (obstore is the ``[s3]`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from downloader.objstore import IndexReader, S3Location, describe, open_store
from downloader.settings import S3Settings
from downloader.storage import NameTakenError, PartFile, Store, UploadError

if TYPE_CHECKING:
    from obstore.store import S3Store

#: Parts of one multipart upload in flight at once: 2 x part_size of memory per
#: large body (obstore's default of 12 would be 96 MiB each at 8 MiB parts).
PART_CONCURRENCY = 2
#: Uploads from a spooled part file in flight at once in one process. obstore reads
#: a single-PUT body whole into memory, so without a bound 64 of them could hold
#: 64 x part_size; with it a process holds at most this many x 2 x part_size.
SPOOLED_UPLOADS = 4

# One client per process and bucket, kept from shard to shard (its connection pool
# with it), like the HTTP session; one index reader per process.
_clients: dict[tuple[str, S3Settings], S3Store] = {}
_indexes: dict[Path, IndexReader] = {}
_spooled: asyncio.Semaphore | None = None


def _spooled_turn() -> asyncio.Semaphore:
    global _spooled
    if _spooled is None:  # made on the worker's one event loop
        _spooled = asyncio.Semaphore(SPOOLED_UPLOADS)
    return _spooled


def _client(bucket: str, s3: S3Settings) -> S3Store:
    key = (bucket, s3)
    if key not in _clients:
        _clients[key] = open_store(bucket, s3)
    return _clients[key]


def _index(path: Path) -> IndexReader:
    if path not in _indexes:
        _indexes[path] = IndexReader(path)
    return _indexes[path]


class ObjectStore(Store):
    """Images as objects under ``location``; part files in the local state folder."""

    def __init__(
        self,
        location: S3Location,
        s3: S3Settings,
        state: Path,
        template: str,
        probe: bool = True,
        parts: Path | None = None,
        index: Path | None = None,
    ) -> None:
        """``state``: the local folder of the run's records, where large bodies are
        spooled. ``index``: the listing of the prefix made when the run began
        (objstore.ObjectIndex); ``probe`` as for the local store."""
        super().__init__(state, template, probe, parts)
        self.location = location
        self.s3 = s3
        self.client = _client(location.bucket, s3)
        self._index = _index(index) if index is not None else None

    @property
    def parts_folder(self) -> Path:
        return self._parts

    def existing(self, stem: str) -> str | None:
        """An image the prefix held under ``stem`` when the run began: no request, the
        run's listing answers (names given out in this run are the parent's business,
        and the conditional PUT is the last guard)."""
        if not self.probe or self._index is None:
            return None
        return self._index.existing(stem)

    async def open_part(self, stem: str) -> ObjectPart:
        return ObjectPart(self, stem, spool=await PartFile.open(self.root, stem, self._parts))

    def write_part(self, stem: str, body: bytes) -> ObjectPart:
        return ObjectPart(self, stem, body=body)

    async def holds(self, relpath: str, sha256: str) -> bool:
        """Does the object already hold these bytes (an attempt killed after its
        upload)? Read and hashed in chunks; False if it cannot be read."""
        digest = hashlib.sha256()
        try:
            result = await obstore.get_async(self.client, self.location.key(relpath))
            async for chunk in result.stream(min_chunk_size=1 << 20):
                digest.update(chunk)
        except Exception:
            return False
        return digest.hexdigest() == sha256

    async def remove(self, relpath: str) -> None:
        with contextlib.suppress(Exception):  # an old version left behind is harmless
            await obstore.delete_async(self.client, self.location.key(relpath))


class ObjectPart:
    """A body on its way to the store: in memory, or spooled to a local part file."""

    def __init__(
        self,
        store: ObjectStore,
        stem: str,
        body: bytes | None = None,
        spool: PartFile | None = None,
    ) -> None:
        self._store = store
        self._stem = stem
        self._body = body
        self._spool = spool

    @property
    def path(self) -> Path:
        """A local file of the body (for ``validate.decode``): a held body is written
        to a part file the first time it is asked for."""
        if self._spool is None:
            assert self._body is not None
            self._spool = PartFile.written(
                self._store.root, self._stem, self._store.parts_folder, self._body
            )
        return self._spool.path

    async def write(self, chunk: bytes) -> None:
        assert self._spool is not None, "a body held in memory takes no more chunks"
        await self._spool.write(chunk)

    async def close(self) -> None:
        if self._spool is not None:
            await self._spool.close()

    async def abort(self) -> None:
        if self._spool is not None:
            await self._spool.abort()

    async def commit(self, ext: str, replace: bool = False, content_type: str | None = None) -> str:
        """Upload the body to its key; returns the name relative to the prefix.

        Without ``replace`` (and with ``s3.no_clobber``) the PUT is conditional
        (``If-None-Match: *``): an object already there is never replaced, and
        NameTakenError says so. A multipart upload (a body over ``s3.part_size``)
        cannot be conditional in obstore: the run's listing guards it instead.
        Any other failure, after obstore's retries, is UploadError.
        """
        await self.close()
        relpath = self._stem + ext
        key = self._store.location.key(relpath)
        s3 = self._store.s3
        source: bytes | Path = self._body if self._body is not None else self.path
        size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
        multipart = size > s3.part_size
        mode: Literal["create", "overwrite"] = (
            "create" if s3.no_clobber and not replace and not multipart else "overwrite"
        )
        turn = _spooled_turn() if isinstance(source, Path) else contextlib.nullcontext()
        try:
            async with turn:
                await obstore.put_async(
                    self._store.client,
                    key,
                    source,
                    attributes={"Content-Type": content_type or "application/octet-stream"},
                    mode=mode,
                    use_multipart=multipart,
                    chunk_size=s3.part_size,
                    max_concurrency=PART_CONCURRENCY,
                )
        except (AlreadyExistsError, PreconditionError):
            raise NameTakenError(relpath) from None
        except Exception as exc:
            url = f"{self._store.location.url}/{relpath}"
            raise UploadError(f"upload to {url} failed: {describe(exc)}") from None
        finally:
            await self.abort()  # the local spool, if any: the object has the bytes now
        return relpath
