"""Parquet input lists: rows read one row group at a time, only the columns used.

A parquet file is read from its end (the footer holds the schema and where the
row groups are), so it must be a local file: not standard input, not a stream.
pyarrow (``pip install 'imgdl[dataset]'``) is imported only when one is read.
Memory is one row group of the used columns plus one batch of Python rows,
whatever the number of rows. A row's "line" is its row number, from 1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO, Any

from downloader.columns import Columns
from downloader.errors import InputError

MAGIC = b"PAR1"
#: rows turned into Python objects at a time (pyarrow reads a row group at a time)
BATCH_ROWS = 1024


def looks_like_parquet(path: str) -> bool:
    """A ``.parquet`` name, or a regular file starting with parquet's magic bytes (a
    pipe is not peeked at: what is read from it would be lost)."""
    if path.lower().endswith((".parquet", ".parq")):
        return True
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as handle:
            return handle.read(len(MAGIC)) == MAGIC
    except OSError:
        return False  # the line reader says what is wrong with it


class ParquetRows:
    """One parquet file's rows as dicts of the columns the settings use."""

    def __init__(self, path: str, columns: Columns) -> None:
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(
                f"{path}: reading parquet needs pyarrow: pip install 'imgdl[dataset]'"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (OSError, pyarrow.ArrowException)
        self.path = path
        try:
            self._handle: IO[bytes] = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise InputError(f"cannot open input {path}: {exc.strerror or exc}") from None
        try:
            self._file = pq.ParquetFile(self._handle)
        except self._errors as exc:
            self._handle.close()
            raise InputError(f"{path}: not a readable parquet file: {exc}") from None
        names = self._file.schema_arrow.names
        missing = columns.missing(names)
        if missing:
            self._handle.close()
            raise InputError(
                f"{path}: no column {', '.join(repr(c) for c in missing)} in the parquet "
                f"schema (columns: {', '.join(names) or 'none'}); name the right ones with "
                "--url-column / --name-column / --extra-column / --hash-column"
            )
        self._columns = columns.required
        self.row_groups = self._file.num_row_groups

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        number = 0
        try:
            for batch in self._file.iter_batches(
                batch_size=BATCH_ROWS, columns=self._columns, use_threads=False
            ):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except self._errors as exc:
            raise InputError(
                f"{self.path}: read failed after row {number}: {exc} (the rows before stand; "
                "run the same command again once the file is whole)"
            ) from None

    def close(self) -> None:
        self._handle.close()
