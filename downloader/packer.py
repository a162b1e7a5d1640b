"""Dataset output formats: the parent packs saved images into shards.

With ``output.format: webdataset`` or ``parquet`` the workers save images exactly
as for ``files``, but into a staging folder, ``RECORDS/.imgdl/staging/``
(``RECORDS`` is OUTDIR, or a task's folder of a split job). The parent, which
already reads every record as shards of work finish, offers each saved sample to
a :class:`Packer`. The packer appends it to the open shard, ``NNNNN.tar.part``
(the image as ``KEY.<ext>`` and its manifest record as ``KEY.json``, streamed
from the staged file) with its metadata row in ``NNNNN.parquet.part``, or, for
``parquet``, the row with the image bytes in ``NNNNN.parquet.part``. When the
shard holds ``output.shard_samples`` samples it is closed, fsynced and renamed
into place (the ``.parquet`` first, then the ``.tar``: the tar is the commit
point of a webdataset shard), its keys go into ``.imgdl/shards.sqlite``, and
only then are the staged files deleted. The last, smaller shard is written when
the run ends with its input read to the end and no stop signal; a stopped run
leaves its samples staged.

Why this keeps the invariants:

- nothing partial at a final name: a shard is written under ``.part`` and renamed;
  the next run deletes every ``.part`` (and a ``.parquet`` without its ``.tar``);
- nothing lost: a staged file is deleted only after its shard is durable and
  indexed. On resume, a line is done if its staged file is there or its key is in
  the index (``exists``); staged samples with a record go into the first new
  shard (``pack_leftovers``); a staged file without a record (killed between the
  rename and the journal line) is found by the worker, ``skipped_exists``, and
  packed then;
- nothing twice: a key already indexed or already in the open shard is not packed
  again; a complete shard missing from the index (killed between the rename and
  the index commit) is indexed from its parquet's ``key`` column at start;
- memory: the open shard's keys and staged paths (``shard_samples`` short
  strings) and one parquet row group (at most ``ROW_GROUP_ROWS`` rows or
  ``ROW_GROUP_BYTES`` of image bytes); images are streamed into the tar.

The sample key is the URL hash (``storage.url_hash``, 32 hex digits): unique per
URL (duplicate lines are not fetched twice) and the same in every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from downloader.contentindex import CONTENT_DB
from downloader.errors import ImgdlError
from downloader.settings import OutputSettings, Settings
from downloader.shardfiles import KEY_COLUMN, WEBDATASET, OpenShard, ShardIndex
from downloader.state import (
    ARCHIVE_DIR,
    FAILURES,
    MANIFEST,
    REPORT_HTML,
    STATE_DIR,
    SUMMARY,
    TASKS_DIR,
    LineSet,
)
from downloader.telemetry import get_logger

FILES = "files"
PARQUET = "parquet"
#: below RECORDS/.imgdl/: the workers' output folder for a dataset format
STAGING = "staging"
#: below RECORDS/.imgdl/: complete shards and their keys
INDEX = "shards.sqlite"
_SHARD = re.compile(r"(\d{5,})\.(tar|parquet)")
_PART = re.compile(r"(\d{5,})\.(tar|parquet)\.part")

log = get_logger()


def check(settings: Settings, s3_output: bool) -> None:
    """Refuse at start what a dataset format cannot do (exit 2), before anything runs."""
    output = settings.output
    fmt = output.format
    if fmt == FILES:
        return
    flag = f"--output-format {fmt}"
    if s3_output:
        raise ImgdlError(
            f"{flag} writes its shards to a local folder; an s3:// output takes the files "
            "format only (write the shards to a local folder, then copy them to the bucket)"
        )
    if settings.input.name_column:
        raise ImgdlError(
            f"{flag} names each sample by its URL hash: input.name_column "
            f"({settings.input.name_column!r}) applies to the files format only"
        )
    if output.name_template != OutputSettings.model_fields["name_template"].default:
        raise ImgdlError(
            f"{flag} names each sample by its URL hash: output.name_template applies to the "
            "files format only"
        )
    if settings.run.revalidate:
        raise ImgdlError(f"{flag} cannot revalidate images already packed into shards")
    require_pyarrow(fmt)


#: what a folder of dataset shards holds besides its shards
_RECORDS = frozenset({STATE_DIR, ARCHIVE_DIR, TASKS_DIR, MANIFEST, FAILURES, SUMMARY, REPORT_HTML})


def check_folder(fmt: str, folder: Path) -> None:
    """One folder, one format: loose images and shards side by side would be two copies
    of a dataset that neither the shards nor the manifest describe whole."""
    if not folder.is_dir():
        return
    names = sorted(entry.name for entry in os.scandir(folder))
    shards = [n for n in names if _SHARD.fullmatch(n) or _PART.fullmatch(n)]
    if fmt == FILES:
        if shards or (folder / STATE_DIR / INDEX).exists():
            raise ImgdlError(
                f"{folder} holds dataset shards ({shards[0] if shards else INDEX}): add to "
                "them with the same --output-format, or write loose files to another folder"
            )
        return
    other = [n for n in names if n not in _RECORDS and n not in shards]
    if other:
        raise ImgdlError(
            f"{folder} holds other files ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}; an earlier files-format run?): "
            f"--output-format {fmt} writes its shards to a folder of their own"
        )


def require_pyarrow(fmt: str) -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImgdlError(
            f"--output-format {fmt} needs pyarrow: pip install 'imgdl[dataset]'"
        ) from None


def sample_key(relpath: str) -> str:
    """The key of a staged image: its name without folder and extension (the URL hash)."""
    return os.path.splitext(os.path.basename(relpath))[0]


def content_db_beside(staging: Path) -> Path:
    """The content table (dedupe.content) of a dataset format: in RECORDS/.imgdl beside
    the staging folder, not inside it, where it would be taken for a sample."""
    return staging.parent / os.path.basename(CONTENT_DB)


def sample_exists(staging: Path) -> Callable[[str], bool]:
    """``exists(relpath)`` for a worker's content index (dedupe.content) under a dataset
    format: the first copy of an image is staged, or packed into a complete shard
    already (its key in the parent's shard index, read here read-only). Without this
    a copy that came after its first was packed would be stored again."""
    index_path = staging.parent / INDEX
    lock = threading.Lock()
    index: ShardIndex | None = None

    def exists(relpath: str) -> bool:
        nonlocal index
        if _nonempty_file(staging / relpath):
            return True
        with lock:
            if index is None:
                if not index_path.exists():
                    return False
                index = ShardIndex(index_path, read_only=True)
            return index.has(sample_key(relpath))

    return exists


def _is_sample(status: Any, reason: Any) -> bool:
    """Does a record with this status name an image that is its line's sample? (A
    duplicate's path is its first line's: not a sample of its own.)"""
    return (status == "saved" and reason is None) or reason == "skipped_exists"


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


class Packer:
    """The parent's side of a dataset format: staged samples in, complete shards out."""

    def __init__(self, fmt: str, shard_samples: int, records_dir: Path) -> None:
        self.format = fmt
        self.shard_samples = shard_samples
        self.folder = records_dir
        self.staging = records_dir / STATE_DIR / STAGING
        self._index_path = records_dir / STATE_DIR / INDEX
        self._index: ShardIndex | None = None
        self._open: OpenShard | None = None
        self._open_keys: set[str] = set()
        self._next = 0
        #: shards this run completed
        self.written = 0

    @property
    def _commit_ext(self) -> str:
        return "tar" if self.format == WEBDATASET else "parquet"

    def start(self) -> ShardIndex:
        """Open the index and make it agree with the shards on disk (called once the
        run holds the folder's lock: by RunState through ``exists``, or by the runner)."""
        if self._index is None:
            self.staging.mkdir(parents=True, exist_ok=True)
            self._index = ShardIndex(self._index_path)
            self._reconcile(self._index)
        return self._index

    def _reconcile(self, index: ShardIndex) -> None:
        before = index.format()
        if before is not None and before != self.format and index.shards():
            raise ImgdlError(
                f"{self.folder} holds {before} shards: write {self.format} shards to "
                f"another folder, or use --output-format {before}"
            )
        index.set_format(self.format)
        complete: dict[int, Path] = {}
        sidecars: dict[int, Path] = {}
        for entry in os.scandir(self.folder):
            part = _PART.fullmatch(entry.name)
            if part:  # a shard being written when a run was killed: its samples are staged
                os.unlink(entry.path)
                continue
            match = _SHARD.fullmatch(entry.name)
            if match and match[2] == self._commit_ext:
                complete[int(match[1])] = Path(entry.path)
            elif match:
                sidecars[int(match[1])] = Path(entry.path)
        if self.format == WEBDATASET:
            for number, path in sidecars.items():
                if number not in complete:  # killed between the two renames
                    path.unlink()
        indexed = index.shards()
        for number in sorted(indexed - complete.keys()):
            log.warning("a shard is gone: its samples will be fetched again", shard=number)
            index.forget(number)
        for number in sorted(complete.keys() - indexed):  # killed before the index commit
            index.add(number, self._keys_of(number, complete[number]))
        for path in self._staged_files():
            if index.has(sample_key(path.name)):  # killed before the staged files went
                path.unlink()
        self._next = max(complete, default=-1) + 1

    def _keys_of(self, number: int, path: Path) -> list[str]:
        """The keys of a complete shard, from its parquet (beside a tar, or itself)."""
        import pyarrow.parquet as pq

        table = self.folder / f"{number:05d}.parquet"
        try:
            keys = pq.read_table(table, columns=[KEY_COLUMN]).column(KEY_COLUMN).to_pylist()
            return [str(k) for k in keys]
        except Exception as exc:  # unreadable metadata: a tar still lists its members
            if self.format != WEBDATASET:
                raise ImgdlError(f"cannot read the shard {path}: {exc}; move it away") from None
        with tarfile.open(path) as tar:
            return sorted({n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".json")})

    def _staged_files(self) -> Iterator[Path]:
        for folder, _, names in os.walk(self.staging):
            for name in names:
                yield Path(folder, name)

    def exists(self, relpath: str) -> bool:
        """Is the image of a record still there: staged, or packed into a shard?"""
        index = self.start()
        return _nonempty_file(self.staging / relpath) or index.has(sample_key(relpath))

    def has_staged(self) -> bool:
        return next(self._staged_files(), None) is not None

    def pack_leftovers(self, records: Iterable[tuple[dict[str, Any], str]]) -> None:
        """Pack the staged samples of a killed run (their records are the newest of
        their lines, newest first), before this run's new ones."""
        self.start()
        staged = {p.relative_to(self.staging).as_posix() for p in self._staged_files()}
        if not staged:
            return
        seen = LineSet()
        for record, text in records:
            line = (record["input"], record["line"])
            if line in seen:
                continue
            seen.add(line)
            if record.get("path") in staged:
                staged.discard(record["path"])
                self.offer(record, text)
        # No record of this run's lists names these (a run over another list moved its
        # records aside; a kill came between the image and its record): they would wait
        # forever and, with content dedupe, stand for copies that are in no shard. A URL
        # that comes again is fetched again.
        for relpath in staged:
            with contextlib.suppress(FileNotFoundError):
                (self.staging / relpath).unlink()
        if staged:
            log.info("staged images without a record removed", images=len(staged))

    def offer_records(self, found: Iterable[tuple[Mapping[str, Any], str]]) -> None:
        """A shard of work's journaled records (decoded, with their text), as the manifest
        gets them: the text is decoded again, so every field the record has (extra input
        columns too) is carried exactly."""
        for record, text in found:
            if record["path"] is not None and _is_sample(record["status"], record["reason"]):
                self.offer(json.loads(text), text)  # not orjson: big integers stay exact

    def offer(self, record: dict[str, Any], text: str) -> None:
        """Pack the image of one record if it is this line's sample and not packed yet."""
        path = record.get("path")
        if not isinstance(path, str) or not _is_sample(record.get("status"), record.get("reason")):
            return
        key = sample_key(path)
        index = self.start()
        staged = self.staging / path
        if key in self._open_keys:
            return
        if index.has(key):  # fetched again (a new list with an old URL): packed already
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            return
        if not _nonempty_file(staged):
            log.warning("a saved image is not in the staging folder", path=path)
            return
        if self._open is None:
            self._open = OpenShard(self.format, self.folder, self._next)
            self._next += 1
        self._open.add(key, staged, record, text)
        self._open_keys.add(key)
        if len(self._open.keys) >= self.shard_samples:
            self._complete()

    def _complete(self) -> None:
        shard, self._open = self._open, None
        assert shard is not None and self._index is not None
        shard.commit()
        self._index.add(shard.number, shard.keys)
        for path in shard.staged:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._open_keys.clear()
        self.written += 1
        log.info("shard written", shard=shard.name, samples=len(shard.keys))

    def finish(self, complete: bool) -> dict[str, Any]:
        """The end of the run: the last, smaller shard if the job is complete (else its
        samples stay staged for the next run); the summary's ``shards`` entry."""
        index = self.start()
        if self._open is not None:
            if complete:
                self._complete()
            else:
                self._open.abort()
                self._open = None
                self._open_keys.clear()
        self._prune_staging()
        shards, samples = index.totals()
        self.close()
        return {
            "format": self.format,
            "shard_samples": self.shard_samples,
            "written": self.written,
            "shards": shards,
            "samples": samples,
        }

    def _prune_staging(self) -> None:
        """Remove the staging folder's empty fan-out folders (a file left, for a line
        still to finish, keeps its own)."""
        for folder, _, names in os.walk(self.staging, topdown=False):
            if folder != str(self.staging) and not names:
                with contextlib.suppress(OSError):  # not empty: a subfolder holds a file
                    os.rmdir(folder)

    def close(self) -> None:
        """Drop an open shard (its samples stay staged) and close the index."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        if self._index is not None:
            self._index.close()
            self._index = None
