"""Parquet input lists: rows read one row group at a time, only the columns used.

A parquet file is read from its end (the footer holds the schema and where the
row groups are), so it must be a local file: not standard input, not a stream.
pyarrow (``pip install 'imgdl[dataset]'``) is imported only when one is read.
A row's "line" is its row number, from 1.

Memory is one batch of the used columns plus its Python rows, whatever the number
of rows or the size of a value: a batch has at most 1,024 rows and fewer when the
row group's metadata says its rows are large (about BATCH_BYTES a batch); string
and binary columns are read as dictionaries, so a huge value repeated in many rows
(1.6 KB of zstd can hold fifty 20 MB captions) is held once, its length checked in
Arrow, and a row whose extra columns are over MAX_EXTRA_BYTES never becomes
Python text. A value Python cannot hold (a date past year 9999, a nanosecond
timestamp) spoils only its own row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import IO, Any

from downloader.columns import MAX_EXTRA_BYTES, Columns, too_large
from downloader.errors import InputError

MAGIC = b"PAR1"
#: most rows turned into Python objects at a time
BATCH_ROWS = 1024
#: Arrow bytes of the used columns a batch aims at (from the row group's metadata)
BATCH_BYTES = 16 << 20

#: a row: its number, its values, and why it cannot be used (None if it can)
Row = tuple[int, dict[str, Any], str | None]


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


def _is_text(kind: Any) -> bool:
    """A string or binary type, or a dictionary of one (as pandas categoricals are)."""
    import pyarrow.types as pt

    if pt.is_dictionary(kind):
        kind = kind.value_type
    return bool(
        pt.is_string(kind)
        or pt.is_large_string(kind)
        or pt.is_binary(kind)
        or pt.is_large_binary(kind)
    )


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
        #: what turning an Arrow value into a Python one raises when Python cannot hold it
        self._unheld: tuple[type[BaseException], ...] = (ValueError, OverflowError, *self._errors)
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
        self._extra = columns.extra
        self.row_groups = self._file.num_row_groups
        schema = self._file.schema_arrow
        textual = [c for c in self._columns if _is_text(schema.field(c).type)]
        if textual:  # read again with the text columns as dictionaries (see the docstring)
            self._file = pq.ParquetFile(self._handle, read_dictionary=textual)
        self._textual = [c for c in textual if c in self._extra]

    def batch_rows(self, group: int) -> int:
        """Rows a batch of row group ``group`` holds: about BATCH_BYTES of the used
        columns by the metadata's uncompressed sizes, at most BATCH_ROWS."""
        meta = self._file.metadata.row_group(group)
        used = set(self._columns)
        size: int = sum(
            meta.column(i).total_uncompressed_size
            for i in range(meta.num_columns)
            if meta.column(i).path_in_schema.split(".")[0] in used
        )
        per_row: int = max(1, size // max(1, meta.num_rows))
        return max(1, min(BATCH_ROWS, BATCH_BYTES // per_row))

    def __iter__(self) -> Iterator[Row]:
        number = 0
        try:
            for group in range(self.row_groups):
                for batch in self._file.iter_batches(
                    batch_size=self.batch_rows(group),
                    row_groups=[group],
                    columns=self._columns,
                    use_threads=False,
                ):
                    for row, problem in self._convert(batch):
                        number += 1
                        yield number, row, problem
        except self._errors as exc:
            raise InputError(
                f"{self.path}: read failed after row {number}: {exc} (the rows before stand; "
                "run the same command again once the file is whole)"
            ) from None

    def _convert(self, batch: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
        """The batch's rows as Python values; a row too large or holding a value Python
        cannot hold gets its problem instead of the values it concerns."""
        import pyarrow.compute as pc

        lengths = self._lengths(batch)
        if not lengths:
            yield from self._rows_of(batch)
            return
        total = lengths[0]
        for more in lengths[1:]:
            total = pc.add(total, more)
        over = pc.greater(total, MAX_EXTRA_BYTES)
        if not pc.any(over).as_py():
            yield from self._rows_of(batch)
            return
        good = iter(self._rows_of(batch.filter(pc.invert(over))))
        plain = [c for c in self._columns if c not in self._extra]
        for i, flag in enumerate(over.to_pylist()):
            if not flag:
                yield next(good)
                continue
            sizes = [length[i].as_py() for length in lengths]
            largest = max(range(len(sizes)), key=sizes.__getitem__)
            row = batch.select(plain).slice(i, 1).to_pylist()[0] if plain else {}
            yield row, too_large(self._textual[largest], sizes[largest], sum(sizes))

    def _lengths(self, batch: Any) -> list[Any]:
        """Per extra string or binary column, its values' bytes (a lower bound of their
        JSON text, null as 0), computed in Arrow: a huge value never becomes Python text."""
        import pyarrow.compute as pc

        found = []
        for name in self._textual:
            column = batch.column(name)
            if hasattr(column, "dictionary"):
                lengths = pc.take(pc.binary_length(column.dictionary), column.indices)
            else:
                lengths = pc.binary_length(column)
            found.append(pc.fill_null(pc.cast(lengths, "int64"), 0))
        return found

    def _rows_of(self, batch: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
        """``to_pylist`` of the batch; if one value cannot become a Python object (a date
        past year 9999, a timestamp with nanoseconds), row by row, value by value."""
        try:
            rows = batch.to_pylist()
        except self._unheld:
            pass
        else:
            for values in rows:
                yield values, None
            return
        for i in range(batch.num_rows):
            row: dict[str, Any] = {}
            problem = None
            for name in self._columns:
                try:
                    row[name] = batch.column(name)[i].as_py()
                except self._unheld as exc:
                    kind = batch.schema.field(name).type
                    reason = str(exc).split(". ")[0]  # not pyarrow's advice to install pandas
                    problem = problem or (
                        f"column '{name}' holds a {kind} value Python cannot hold: {reason}"
                    )
            yield row, problem

    def close(self) -> None:
        self._handle.close()
