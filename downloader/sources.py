"""Read URL lists of every format, one line at a time, in constant memory.

Formats: plain text (one URL a line, ``#`` comments), CSV/TSV with a header,
JSON Lines; each optionally gzip-compressed (detected from the bytes, not the
name); ``-`` is standard input; and parquet files (parquetinput.py), a row
group at a time. Extra columns and the expected hash are read here
(columns.py). A bad *line* becomes an ``invalid_url``
outcome with its file and line number; only an input that cannot be opened or
has no usable header is an :class:`InputError`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import io
import itertools
import json
import os
import re
import sys
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from downloader.columns import Columns, ExtraTooLarge, InvalidHash
from downloader.errors import InputError
from downloader.objstore import is_s3
from downloader.objstore import open_input as open_object
from downloader.outcomes import Job, Outcome, Reason
from downloader.parquetinput import MAGIC as PARQUET_MAGIC
from downloader.parquetinput import ParquetRows, looks_like_parquet
from downloader.settings import InputSettings, S3Settings
from downloader.sharding import TICK, Tick

STDIN = "-"
_SUFFIX_FORMATS = {
    ".txt": "txt",
    ".lst": "txt",
    ".list": "txt",
    ".urls": "txt",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_GZIP_MAGIC = b"\x1f\x8b"
#: Longest input line read; a longer one is an invalid line, skipped to its end.
MAX_LINE_BYTES = 1 << 20


#: A character no URL may hold: what str.isspace() calls a space (the pattern's
#: \s is the same test), a control character below 32, or DEL. One search instead
#: of a Python test per character (3-4 µs a line of the parent's CPU, issue 5).
_BAD_URL_CHAR = re.compile(r"[\x00-\x1f\x7f\s]")


#: A URL that check_url accepts without taking it apart: a lower-case scheme, a
#: host of letters, digits, dots and dashes, a port of digits that are not all zero
#: (within range, checked after), then a path, query or fragment. Most lines
#: are such URLs; urlsplit for them was 3-4 us a line of the parent (issue 5).
_PLAINLY_VALID = re.compile(r"https?://[A-Za-z0-9.-]+(?::0*([1-9][0-9]{0,4}))?(?:[/?#].*)?")


class InvalidUrl(ValueError):
    """A URL imgdl will not try to fetch; the message says why."""


def check_url(raw: str) -> str:
    """Return the URL stripped of surrounding blanks, or raise InvalidUrl saying why."""
    url = raw.strip()
    if not url:
        raise InvalidUrl("empty URL")
    if _BAD_URL_CHAR.search(url):
        raise InvalidUrl("URL contains whitespace or control characters")
    plain = _PLAINLY_VALID.fullmatch(url)
    if plain is not None and (plain[1] is None or int(plain[1]) <= 65535):
        return url
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidUrl(f"cannot parse URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        shown = f"'{parts.scheme}'" if parts.scheme else "none"
        raise InvalidUrl(f"scheme must be http or https (got {shown})")
    if not parts.hostname:
        raise InvalidUrl("URL has no host")
    if port == 0:
        raise InvalidUrl("port 0 is not a valid port")
    return url


@dataclasses.dataclass
class _Line:
    number: int
    text: str | None  # None: the bytes were not UTF-8
    error: str | None = None


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read put back in front of it."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        read1 = getattr(self._rest, "read1", self._rest.read)
        data = read1(len(buffer)) or b""
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()


def open_binary(path: str, opened: IO[bytes] | None = None) -> IO[bytes]:
    """The bytes of an input list, gzip undone when the first bytes say so.
    ``opened``: the list's stream when it is not a file (an s3:// object)."""
    raw: IO[bytes]
    if opened is not None:
        raw = opened
    elif path == STDIN:
        # Our own unbuffered handle on fd 0, not sys.stdin.buffer: a reader thread
        # blocked in it at exit must not hold the lock of a standard stream, which
        # the interpreter flushes on its way out (a fatal error otherwise).
        raw = io.FileIO(sys.stdin.fileno(), "rb", closefd=False)
        os.set_blocking(sys.stdin.fileno(), True)  # a non-blocking fd would read as empty
    else:
        try:
            raw = open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            raise InputError(
                f"cannot open input {path}: {exc.strerror or exc} (check the path; "
                "'-' reads standard input)"
            ) from None
    try:
        head = b""
        while len(head) < 4:  # a pipe may hand over one byte at a time
            more = raw.read(4 - len(head))
            if not more:
                break
            head += more
    except OSError as exc:
        raise InputError(f"cannot read input {path}: {exc.strerror or exc}") from None
    stream: IO[bytes] = io.BufferedReader(_Prefixed(head, raw))
    compressed = head[:2] == _GZIP_MAGIC
    if compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
        try:
            head = stream.peek(4)[:4]  # type: ignore[attr-defined]
        except (OSError, EOFError, zlib.error):
            head = b""  # a broken stream: the first read reports it, with its line
    _refuse_parquet(head, path, compressed)
    return stream


def _refuse_parquet(head: bytes, path: str, compressed: bool) -> None:
    """A parquet file that is piped in or gzipped would be read as lines of text, each an
    invalid URL: say what it is instead."""
    if head == PARQUET_MAGIC:
        fix = "gunzip it" if compressed else "save it to a file"
        raise InputError(
            f"{path}: this is a parquet file{' (gzip-compressed)' if compressed else ''}; "
            f"parquet lists are read from their end, so they must be local, uncompressed "
            f"files: {fix} first"
        )


def _skip_rest_of_line(stream: IO[bytes]) -> None:
    while True:
        rest = stream.readline(MAX_LINE_BYTES)
        if not rest or rest.endswith(b"\n"):
            return


def _lines(stream: IO[bytes], label: str) -> Iterator[_Line]:
    number = 0
    try:
        while True:
            raw = stream.readline(MAX_LINE_BYTES)
            if not raw:
                return
            number += 1
            if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
                _skip_rest_of_line(stream)
                yield _Line(number, None, f"line is longer than {MAX_LINE_BYTES} bytes")
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield _Line(number, raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                yield _Line(number, None, "line is not valid UTF-8")
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(
            f"{label}: read failed after line {number}: {exc} (the lines before stand; "
            "run the same command again once the file is whole)"
        ) from None


def _format_of(path: str, first: str | None, settings: InputSettings) -> str:
    if settings.format != "auto":
        return settings.format
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    fmt = _SUFFIX_FORMATS.get(Path(name).suffix)
    if fmt is not None:
        return fmt
    sample = (first or "").lstrip()
    if sample.startswith("{"):
        return "jsonl"
    for delimiter, candidate in (("\t", "tsv"), (",", "csv")):
        if delimiter in sample:
            cells = next(csv.reader([sample], delimiter=delimiter, skipinitialspace=True), [])
            if settings.url_column in (c.strip() for c in cells):
                return candidate
    return "txt"


class InputList:
    """One input list. Opening it reads the header, so a bad file fails before the run."""

    def __init__(self, path: str, settings: InputSettings, s3: S3Settings | None = None) -> None:
        self.path = path
        self.label = path
        self.settings = settings
        self.columns = Columns(settings)
        #: size and ETag of an s3:// list (a local file's are read by state.fingerprint)
        self.fingerprint: dict[str, Any] | None = None
        #: Set when the input broke off mid-way (a cut gzip stream, an I/O error).
        self.error: str | None = None
        self._parquet: ParquetRows | None = None
        if self._is_parquet():
            self.format = "parquet"
            self._parquet = ParquetRows(path, self.columns)
            return
        if is_s3(path):
            raw, self.fingerprint = open_object(path, s3 or S3Settings())
            self._stream = open_binary(path, opened=raw)
        else:
            self._stream = open_binary(path)
        self._lines = _lines(self._stream, path)
        first = self._first_meaningful()
        self.format = _format_of(path, first.text if first else None, settings)
        self._pending: list[_Line] = [first] if first else []
        if self.format == "jsonl" and first is not None and (first.text or "").lstrip()[:1] == "[":
            self.close()
            raise InputError(
                f"{path} holds a JSON array; imgdl reads JSON Lines (one object a line): "
                f"convert it with jq -c '.[]' {path}"
            )
        self._header: list[str] = []
        if self.format in ("csv", "tsv") and first is not None:
            self._pending = []
            self._read_header(first)

    def _is_parquet(self) -> bool:
        """Parquet by setting, by name or by magic bytes; a parquet file is read from its
        end, so only a local file can be one."""
        wanted = self.settings.format == "parquet" or (
            self.settings.format == "auto"
            and (
                self.path.lower().endswith((".parquet", ".parq"))
                or (self.path != STDIN and not is_s3(self.path) and looks_like_parquet(self.path))
            )
        )
        if wanted and (self.path == STDIN or is_s3(self.path)):
            raise InputError(
                f"{self.path}: a parquet list must be a local file (it is read from its "
                "end): download it first, or convert it to CSV/JSON Lines to stream it"
            )
        return wanted

    def _first_meaningful(self) -> _Line | None:
        """The first line that is neither blank nor a comment (those have no outcome)."""
        for line in self._lines:
            if line.text is not None and (
                not line.text.strip() or line.text.lstrip().startswith("#")
            ):
                continue
            return line
        return None

    def _read_header(self, line: _Line) -> None:
        if line.text is None:
            raise InputError(
                f"{self.label}: the header line is not valid UTF-8 (save the file as UTF-8)"
            )
        self._header = next(
            csv.reader([line.text], delimiter=self._delimiter, skipinitialspace=True)
        )
        self._header = [h.strip() for h in self._header]
        missing = self.columns.missing(self._header)
        if missing:
            raise InputError(
                f"{self.label}: no column {', '.join(repr(c) for c in missing)} in the header "
                f"(columns: {', '.join(self._header) or 'none'}); "
                "name the right ones with --url-column / --name-column / --extra-column / "
                "--hash-column (input.url_column, input.name_column, input.extra_columns, "
                "input.hash_column)"
            )

    @property
    def _delimiter(self) -> str:
        return "\t" if self.format == "tsv" else ","

    def __iter__(self) -> Iterator[Job | Outcome]:
        if self._parquet is not None:
            yield from self._rows(self._parquet)
            return
        try:
            for line in itertools.chain(self._pending, self._lines):
                item = self._parse(line)
                if item is not None:
                    yield item
        except InputError as exc:  # the lines read so far stand; the rest is lost
            self.error = str(exc)
        finally:
            self.close()

    def _rows(self, rows: ParquetRows) -> Iterator[Job | Outcome]:
        try:
            for number, record, problem in rows:
                if problem is None:
                    yield self._from_record(number, record)
                    continue
                url = record.get(self.settings.url_column)
                url = url.strip() if isinstance(url, str) else ""
                yield self._invalid(number, url, problem, record)
        except InputError as exc:
            self.error = str(exc)
        finally:
            self.close()

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif self.path != STDIN:
            self._stream.close()

    def _invalid(
        self, number: int, url: str, error: str, record: dict[str, Any] | None = None
    ) -> Outcome:
        """A bad line's outcome, with the extra columns it has (null if it has none, or
        if they are too large: then the error says so too)."""
        try:
            extra = self.columns.extra_of(record, empty_is_null=self.format in ("csv", "tsv"))
        except ExtraTooLarge as exc:
            extra = self.columns.extra_of(None)
            error = f"{error}; {exc}"
        job = Job(url=url, input=self.label, line=number, extra=extra)
        return Outcome.not_saved(job, Reason.INVALID_URL, error=error)

    def _parse(self, line: _Line) -> Job | Outcome | None:
        if line.text is None:
            return self._invalid(line.number, "", line.error or "undecodable line")
        text = line.text
        if not text.strip():
            return None
        if self.format == "txt":
            if text.lstrip().startswith("#"):
                return None
            return self._job(line.number, text, None, None)
        if self.format == "jsonl":
            return self._parse_json(line, text)
        return self._parse_csv(line, text)

    def _parse_json(self, line: _Line, text: str) -> Job | Outcome:
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            return self._invalid(line.number, "", f"not valid JSON: {exc.msg}")
        if not isinstance(record, dict):
            return self._invalid(line.number, "", "JSON line is not an object")
        return self._from_record(line.number, record)

    def _from_record(self, number: int, record: dict[str, Any]) -> Job | Outcome:
        """A JSON object's or a parquet row's job: values keep their types."""
        url = record.get(self.settings.url_column)
        if not isinstance(url, str):
            return self._invalid(
                number, "", f"no string '{self.settings.url_column}' value", record
            )
        name = record.get(self.settings.name_column) if self.settings.name_column else None
        return self._job(number, url, name if isinstance(name, str) else None, record)

    def _parse_csv(self, line: _Line, text: str) -> Job | Outcome:
        try:
            row = next(csv.reader([text], delimiter=self._delimiter, skipinitialspace=True))
        except csv.Error as exc:
            return self._invalid(line.number, "", f"malformed CSV line: {exc}")
        if len(row) != len(self._header):
            return self._invalid(
                line.number, "", f"expected {len(self._header)} columns, got {len(row)}"
            )
        record = dict(zip(self._header, row, strict=True))
        name = record.get(self.settings.name_column) if self.settings.name_column else None
        return self._job(line.number, record[self.settings.url_column], name, record)

    def _job(
        self, number: int, url: str, name: str | None, record: dict[str, Any] | None
    ) -> Job | Outcome:
        try:
            clean = check_url(url)
            expected = self.columns.hash_of(record)
            extra = self.columns.extra_of(record, empty_is_null=self.format in ("csv", "tsv"))
        except InvalidUrl as exc:
            return self._invalid(number, url.strip(), str(exc), record)
        except InvalidHash as exc:
            return self._invalid(number, clean, str(exc), record)
        except ExtraTooLarge as exc:
            return self._invalid(number, clean, str(exc))
        return Job(
            url=clean,
            input=self.label,
            line=number,
            name=name or None,
            extra=extra,
            expected_hash=expected,
        )


def open_inputs(
    paths: Iterable[str], settings: InputSettings, s3: S3Settings | None = None
) -> list[InputList]:
    """Open every input up front so a missing file or bad header stops the run before it starts."""
    paths = list(paths)
    if paths.count(STDIN) > 1:
        raise InputError("standard input ('-') can be given only once")
    seen: dict[str, str] = {}
    for path in (p for p in paths if p != STDIN):
        real = path if is_s3(path) else os.path.realpath(path)
        if real in seen:
            raise InputError(
                f"input {path} is given twice (as {seen[real]} too): give each list once"
            )
        seen[real] = path
    opened: list[InputList] = []
    try:
        for path in paths:
            opened.append(InputList(path, settings, s3))
    except BaseException:
        for item in opened:
            item.close()
        raise
    return opened


def read_all(inputs: Iterable[InputList]) -> Iterator[Job | Outcome]:
    for item in inputs:
        yield from item


class _End:
    """The reader thread's last item: the inputs are over."""


_END = _End()


def read_in_background(
    inputs: Iterable[InputList], buffered: int, poll: float
) -> Iterator[Job | Outcome | Tick]:
    """``read_all`` in a thread, so that the caller never blocks on a slow input.

    Yields ``TICK`` whenever nothing new arrived for ``poll`` seconds. At most
    ``buffered`` items wait in between. A blocking read on a pipe cannot be
    interrupted; the thread is a daemon, so it never holds the process up.

    The hand-over is a ``deque`` (appends and pops are atomic) with two events that
    are touched only when a side has to wait: the caller takes every item read so far
    without a lock per item. A ``queue.Queue`` took two locks and a notify per line,
    and a GIL hand-off whenever the caller had emptied it (5-10 µs a line of the
    parent's CPU, issue 5). An item is never held back to fill a batch: what a slow
    pipe yields is taken at once.
    """
    items: collections.deque[Job | Outcome | BaseException | _End] = collections.deque()
    arrived = threading.Event()  # cleared by the caller before it waits for items
    room = threading.Event()  # cleared by the reader before it waits for room
    room.set()
    low = max(1, buffered // 2)

    def read() -> None:
        try:
            for item in read_all(inputs):
                items.append(item)
                if not arrived.is_set():
                    arrived.set()
                if len(items) >= buffered:
                    room.clear()
                    if len(items) >= buffered:  # the caller may have taken some since
                        room.wait()
        except BaseException as exc:  # handed over; raised in the caller's thread
            items.append(exc)
        finally:
            items.append(_END)
            arrived.set()

    threading.Thread(target=read, name="imgdl-reader", daemon=True).start()
    while True:
        if not items:
            arrived.clear()
            if not items and not arrived.wait(poll):
                yield TICK
            continue
        item = items.popleft()
        if len(items) < low and not room.is_set():
            room.set()
        if isinstance(item, _End):
            return
        if isinstance(item, BaseException):
            raise item
        yield item
