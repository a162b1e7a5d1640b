"""The files of a dataset shard and the index of complete ones (see packer.py).

``ShardIndex`` is ``.imgdl/shards.sqlite``; ``OpenShard`` is a shard being
filled under its ``.part`` names, streamed member by member into a tar and a
row group at a time into parquet, and committed by fsync and rename. Only the
parent imports this module, and only for the webdataset and parquet formats:
pyarrow is imported where it is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

import orjson

from downloader.outcomes import Outcome
from downloader.storage import write_all

WEBDATASET = "webdataset"
#: the column of the sample key, and (parquet format) of the image bytes
KEY_COLUMN = "key"
IMAGE_COLUMN = "image"
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 32 * 1024 * 1024


def _key_bytes(key: str) -> bytes:
    try:
        return bytes.fromhex(key)
    except ValueError:  # not a URL hash: cannot happen with the fixed template
        return key.encode("utf-8", "surrogatepass")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardIndex:
    """``.imgdl/shards.sqlite``: the complete shards and the keys each holds (16 bytes
    a key), so that a resumed run knows which samples are packed without reading the
    shards, and never packs one twice."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """``read_only``: a worker's view (the parent writes it), usable from any thread."""
        if read_only:
            self._db = sqlite3.connect(
                f"{path.as_uri()}?mode=ro", uri=True, timeout=60, check_same_thread=False
            )
            return
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);"
            "CREATE TABLE IF NOT EXISTS shards (n INTEGER PRIMARY KEY, samples INTEGER);"
            "CREATE TABLE IF NOT EXISTS keys (key BLOB PRIMARY KEY, shard INTEGER)"
            " WITHOUT ROWID;"
        )

    def format(self) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        return None if row is None else str(row[0])

    def set_format(self, fmt: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('format', ?)", (fmt,))

    def shards(self) -> set[int]:
        return {int(n) for (n,) in self._db.execute("SELECT n FROM shards")}

    def has(self, key: str) -> bool:
        found = self._db.execute("SELECT 1 FROM keys WHERE key = ?", (_key_bytes(key),))
        return found.fetchone() is not None

    def add(self, number: int, keys: list[str]) -> None:
        """One transaction: the shard and its keys are indexed together or not at all."""
        self._db.execute("BEGIN")
        try:
            self._db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?)", (number, len(keys)))
            self._db.executemany(
                "INSERT OR IGNORE INTO keys VALUES (?, ?)", ((_key_bytes(k), number) for k in keys)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def forget(self, number: int) -> None:
        self._db.execute("DELETE FROM keys WHERE shard = ?", (number,))
        self._db.execute("DELETE FROM shards WHERE n = ?", (number,))

    def totals(self) -> tuple[int, int]:
        count, samples = self._db.execute("SELECT count(*), total(samples) FROM shards").fetchone()
        return int(count), int(samples)

    def close(self) -> None:
        self._db.close()


def _kind(annotation: str) -> str:
    """The parquet type of a manifest field, from its annotation in ``Outcome``."""
    if "dict" in annotation or "list" in annotation:
        return "json"
    for kind in ("bool", "int", "float"):
        if re.search(rf"\b{kind}\b", annotation):
            return kind
    return "string"


def _kind_of(value: Any) -> str:
    """The parquet type of a record field ``Outcome`` does not declare (an extra input
    column), from its first value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None or isinstance(value, str):
        return "string"
    return "json"


_DECLARED = {name: _kind(str(annotation)) for name, annotation in Outcome.__annotations__.items()}


def _coerce(value: Any, kind: str) -> Any:
    """``value`` as a cell of a ``kind`` column; None when it does not fit."""
    if value is None:
        return None
    if kind in ("string", "json"):
        if not isinstance(value, str):
            try:
                return orjson.dumps(value, default=str).decode("utf-8")
            except TypeError:  # a lone surrogate or an integer past 64 bits: orjson refuses
                return json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=str)
        # a lone surrogate (kept from undecodable bytes) is not UTF-8
        return value if value.isascii() else value.encode("utf-8", "replace").decode("utf-8")
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "float":
        return float(value) if isinstance(value, int | float) else None
    return None


class _Table:
    """A parquet file written a row group at a time (pyarrow.parquet.ParquetWriter).

    Columns: ``key``, then the fields of the first record in its order (the types of
    ``Outcome``'s fields from their annotations, others from their first value), then
    ``image`` (binary) for the parquet format. A field a later record adds is in its
    ``.json`` (webdataset) but not a column of this shard."""

    def __init__(self, path: Path, with_image: bool) -> None:
        self.path = path
        self._with_image = with_image
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0
        self._kinds: dict[str, str] | None = None
        self._writer: Any = None

    def add(self, key: str, record: dict[str, Any], image: bytes | None = None) -> None:
        if self._kinds is None:
            self._kinds = {KEY_COLUMN: "string"}
            for name, value in record.items():
                if name not in (KEY_COLUMN, IMAGE_COLUMN):
                    self._kinds[name] = _DECLARED.get(name) or _kind_of(value)
        row = {**record, KEY_COLUMN: key}
        if self._with_image:
            row[IMAGE_COLUMN] = image
            self._bytes += len(image or b"")
        self._rows.append(row)
        if len(self._rows) >= ROW_GROUP_ROWS or self._bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _schema(self) -> Any:
        import pyarrow as pa

        assert self._kinds is not None
        types = {
            "string": pa.string(),
            "json": pa.string(),
            "int": pa.int64(),
            "float": pa.float64(),
            "bool": pa.bool_(),
        }
        fields = [pa.field(name, types[kind]) for name, kind in self._kinds.items()]
        if self._with_image:
            fields.append(pa.field(IMAGE_COLUMN, pa.binary()))
        return pa.schema(fields)

    def _flush(self) -> None:
        if not self._rows:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert self._kinds is not None
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self._schema())
        columns = {
            name: [_coerce(row.get(name), kind) for row in self._rows]
            for name, kind in self._kinds.items()
        }
        if self._with_image:
            columns[IMAGE_COLUMN] = [row[IMAGE_COLUMN] for row in self._rows]
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self._writer.schema))
        self._rows.clear()
        self._bytes = 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        self._rows.clear()
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
        self._writer = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_BLOCK = 512


class _Tar:
    """A ustar file written member by member: the header (``tarfile.TarInfo.tobuf``,
    so the format is the standard library's), then the image copied by the kernel
    (``os.sendfile``: no copy through the parent's memory), then the padding.
    ``tarfile.addfile`` cost twice as much CPU in the parent for the same file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @staticmethod
    def _header(name: str, size: int, mtime: float) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(mtime), 0o644
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")

    @staticmethod
    def _padding(size: int) -> bytes:
        return bytes(-size % _BLOCK)

    def add_file(self, name: str, source: Path, mtime: float) -> None:
        with open(source, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            write_all(self._fd, self._header(name, size, mtime))
            self._copy(handle.fileno(), size)
        write_all(self._fd, self._padding(size))

    def _copy(self, source: int, size: int) -> None:
        done = 0
        try:
            while done < size:
                sent = os.sendfile(self._fd, source, done, size - done)
                if sent == 0:
                    break
                done += sent
        except OSError:  # a file system without sendfile between files: read and write
            os.lseek(source, done, os.SEEK_SET)
            while done < size and (block := os.read(source, min(1 << 20, size - done))):
                write_all(self._fd, block)
                done += len(block)
        if done != size:  # the staged file shrank: it is never written after its rename
            raise OSError(f"{self.path}: copied {done} of {size} bytes")

    def add_bytes(self, name: str, data: bytes, mtime: float) -> None:
        header = self._header(name, len(data), mtime)
        write_all(self._fd, header + data + self._padding(len(data)))

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), fsync, close."""
        write_all(self._fd, bytes(2 * _BLOCK))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class OpenShard:
    """The shard being filled, under its ``.part`` names."""

    def __init__(self, fmt: str, folder: Path, number: int) -> None:
        self.number = number
        self.name = f"{number:05d}"
        self.folder = folder
        self.keys: list[str] = []
        self.staged: list[Path] = []
        self.tar = _Tar(folder / f"{self.name}.tar.part") if fmt == WEBDATASET else None
        self.table = _Table(folder / f"{self.name}.parquet.part", with_image=self.tar is None)

    def add(self, key: str, staged: Path, record: dict[str, Any], text: str) -> None:
        ext = os.path.splitext(staged.name)[1]
        mtime = record.get("finished_at") or time.time()
        if self.tar is not None:
            self.tar.add_file(key + ext, staged, mtime)
            self.tar.add_bytes(f"{key}.json", text.encode("utf-8", "surrogatepass"), mtime)
            self.table.add(key, record)
        else:
            self.table.add(key, record, staged.read_bytes())
        self.keys.append(key)
        self.staged.append(staged)

    def commit(self) -> None:
        """Close, fsync, rename into place: the parquet, then the tar (the commit point)."""
        self.table.close()
        _fsync(self.table.path)
        if self.tar is not None:
            self.tar.close()
        os.replace(self.table.path, self.folder / f"{self.name}.parquet")
        if self.tar is not None:
            os.replace(self.tar.path, self.folder / f"{self.name}.tar")
        _fsync(self.folder)

    def abort(self) -> None:
        self.table.abort()
        if self.tar is not None:
            self.tar.abort()
