"""What a line carries besides its URL: extra columns and an expected hash.

``input.extra_columns`` travel with the Job as the JSON text of one object (a
string is the smallest thing to hold in the parent and to pickle to a worker)
into the ``extra`` field of the line's record. ``input.hash_column`` is parsed
here, in the parent, so that a malformed value is that line's invalid-input
outcome; the worker only compares (:class:`BodyHash`).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from downloader.settings import InputSettings

#: hex digits of each algorithm input.hash_column may give
HASH_LENGTHS = {"sha256": 64, "md5": 32}
_BY_LENGTH = {n: name for name, n in HASH_LENGTHS.items()}
_HEX = re.compile(r"[0-9a-f]+")
_SHOWN = 80
#: Longest JSON text of one line's extra columns (UTF-8 bytes). The text travels with
#: the line's Job through the queues and shard files into each of its records, so a
#: line over it is invalid instead (a caption or alt text is far below: hundreds of
#: bytes). Lower than the 1 MiB cap of a text line: one parquet row has no such cap.
MAX_EXTRA_BYTES = 64 << 10


class ExtraTooLarge(ValueError):
    """A line whose extra columns are over MAX_EXTRA_BYTES; says which column."""


def too_large(column: str, size: int, total: int) -> str:
    """The error of a line whose extra columns are ``total`` bytes, ``size`` of them in
    ``column`` (the largest)."""
    return (
        f"column '{column}' holds {size} bytes: a line's extra columns may hold at most "
        f"{MAX_EXTRA_BYTES} bytes (input.extra_columns; this line's: {total})"
    )


class InvalidHash(ValueError):
    """An input.hash_column value that is not a hash imgdl can check; says why."""


def parse_hash(value: Any, algorithm: str = "auto", column: str = "hash") -> str | None:
    """``"sha256:<hex>"`` or ``"md5:<hex>"`` (lower case) from a column's value; None
    when the line gives none (null, missing, empty). Accepts ``sha256:``/``md5:``
    prefixes, bare hex (the algorithm from ``algorithm``, or from the length when
    ``auto``) and raw digests (parquet binary columns of 32 or 16 bytes)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        name = _BY_LENGTH.get(len(value) * 2)
        if name is None or algorithm not in ("auto", name):
            raise InvalidHash(
                f"column '{column}' holds {len(value)} bytes: not a "
                f"{'sha256 or md5' if algorithm == 'auto' else algorithm} digest"
            )
        return f"{name}:{bytes(value).hex()}"
    if not isinstance(value, str):
        kind = {"int": "a number", "float": "a number", "bool": "true/false"}.get(
            type(value).__name__, f"a {type(value).__name__} value"
        )
        raise InvalidHash(f"column '{column}' holds {kind}, not a hex string")
    text = value.strip().lower()
    if not text:
        return None
    prefix, colon, digits = text.partition(":")
    if colon:
        name = prefix
        if name not in HASH_LENGTHS:
            raise InvalidHash(
                f"column '{column}': unknown hash algorithm {prefix[:_SHOWN]!r} (sha256 or md5)"
            )
    else:
        digits = text
        found = _BY_LENGTH.get(len(digits)) if algorithm == "auto" else algorithm
        if found is None:
            raise InvalidHash(
                f"column '{column}': {value[:_SHOWN]!r} is neither 64 hex digits (sha256) "
                "nor 32 (md5)"
            )
        name = found
    if len(digits) != HASH_LENGTHS[name] or not _HEX.fullmatch(digits):
        raise InvalidHash(
            f"column '{column}': {value[:_SHOWN]!r} is not a {name} hash "
            f"({HASH_LENGTHS[name]} hex digits)"
        )
    return f"{name}:{digits}"


def _jsonable(value: Any) -> Any:
    """Parquet values JSON has no type for: binary as base64, decimals and durations
    as text (no precision lost)."""
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal | datetime.timedelta):
        return str(value)
    raise TypeError(f"cannot carry a {type(value).__name__} value")


def encode_extra(values: Any) -> str:
    """The JSON text of a line's extra columns (or of one value)."""
    try:
        return orjson.dumps(values, default=_jsonable).decode("utf-8")
    except TypeError:  # a lone surrogate from a JSON escape: orjson refuses it
        return json.dumps(values, ensure_ascii=True, separators=(",", ":"), default=str)


class Columns:
    """The columns input settings ask of a line, beyond its URL and name."""

    def __init__(self, settings: InputSettings) -> None:
        self.extra = tuple(settings.extra_columns)
        self.hash_column = settings.hash_column
        self.algorithm = settings.hash_algorithm
        named = [settings.url_column, settings.name_column, *self.extra, self.hash_column]
        #: every column a CSV/TSV header or parquet schema must have, once each
        self.required = list(dict.fromkeys(c for c in named if c))

    def missing(self, available: Iterable[str]) -> list[str]:
        have = set(available)
        return [c for c in self.required if c not in have]

    def extra_of(self, record: Mapping[str, Any] | None, empty_is_null: bool = False) -> str | None:
        """The line's extra columns as JSON text; a value it lacks is null (and an
        empty CSV cell, ``empty_is_null``). None when no extra columns are configured.
        Raises ExtraTooLarge when the text is over MAX_EXTRA_BYTES."""
        if not self.extra:
            return None
        if record is None:
            return encode_extra(dict.fromkeys(self.extra))
        values = {c: record.get(c) for c in self.extra}
        if empty_is_null:
            values = {c: v if v != "" else None for c, v in values.items()}
        text = encode_extra(values)
        if len(text) > MAX_EXTRA_BYTES // 4 and len(text.encode()) > MAX_EXTRA_BYTES:
            sizes = {c: len(encode_extra(v).encode()) for c, v in values.items()}
            column = max(sizes, key=lambda c: sizes[c])
            raise ExtraTooLarge(too_large(column, sizes[column], len(text.encode())))
        return text

    def hash_of(self, record: Mapping[str, Any] | None) -> str | None:
        """The line's expected hash, checked; raises InvalidHash."""
        if self.hash_column is None or record is None:
            return None
        return parse_hash(record.get(self.hash_column), self.algorithm, self.hash_column)


class BodyHash:
    """Checks a body against a line's expected hash. sha256 comes from the digest the
    download computes anyway; md5 is computed only for a line that asks for it."""

    def __init__(self, expected: str) -> None:
        self.algorithm, _, self.expected = expected.partition(":")
        self._md5 = hashlib.md5(usedforsecurity=False) if self.algorithm == "md5" else None

    def update(self, chunk: bytes) -> None:
        if self._md5 is not None:
            self._md5.update(chunk)

    def mismatch(self, sha256_hex: str) -> str | None:
        """None if the body matches; else the message naming expected and got."""
        got = self._md5.hexdigest() if self._md5 is not None else sha256_hex
        if got == self.expected:
            return None
        return f"{self.algorithm} mismatch: expected {self.expected}, got {got}"
