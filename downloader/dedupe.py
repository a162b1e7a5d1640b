"""The same URL twice in one run is fetched once; later lines become ``duplicate``.

The set of URLs seen lives in a SQLite file in ``OUTDIR/.imgdl`` (128 bits of
the URL's sha256 per row), not in memory: a 10-million-line list costs a few
hundred MB of disk, a 16 MiB page cache and a 16 MiB bitmap, whatever its length. A duplicate
line is recorded when the outcome of the first line with its URL is known: at
once if it is known already, else when that line's shard is merged. It then
points at the first line (``duplicate_of``) and, if the first was saved, at its
file (``path``). If the first failed, the duplicate fails with the same reason.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from downloader.errors import UnsafeNameError
from downloader.outcomes import Job, Outcome, Reason, Status
from downloader.state import LineSet

if TYPE_CHECKING:
    from downloader.settings import Settings

_COMMIT_EVERY = 10_000
_INSERT_BATCH = 1_000
# A fixed 16 MiB bitmap in front of the table: a URL whose bit is clear is new
# without asking SQLite, so most lines cost one statement, not two.
_BITMAP_BITS = 1 << 27
_BITMAP_MASK = _BITMAP_BITS - 1
_CACHE_KIB = 4 * 1024
#: A line's key in the ``done`` table: its number in the low 40 bits (a trillion
#: lines), its input's number above.
_LINE_BITS = 40


_TWO_KEYS = struct.Struct(">qq")


def _keys(url: str) -> tuple[int, int]:
    """The first two signed big-endian 64-bit words of the URL's sha256."""
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
    h, h2 = _TWO_KEYS.unpack_from(digest)
    return h, h2


class First(NamedTuple):
    """What a later line with the same URL needs of the first line's outcome: the
    compact form the table keeps (not the whole record, about 600 bytes of JSON)."""

    input: str
    line: int
    status: str
    reason: str | None
    http_status: int | None
    error: str | None
    path: str | None


def resolve(job: Job, first: First) -> Outcome:
    """The outcome of ``job``, a later line with the same URL as the line of ``first``."""
    where = f"{first.input}:{first.line}"
    if first.status == Status.FAILED:
        return Outcome.not_saved(
            job,
            Reason(first.reason) if first.reason else Reason.INTERNAL_ERROR,
            http_status=first.http_status,
            error=f"same URL as {where}, which failed: {first.error or first.reason}",
            duplicate_of=where,
        )
    return Outcome.not_saved(job, Reason.DUPLICATE, path=first.path, duplicate_of=where)


def _blob(text: str | None) -> bytes | None:
    """A record's text as it is stored: an error may quote a server's undecodable
    bytes as lone surrogates, which SQLite's text cannot hold (``_text`` undoes it)."""
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _text(blob: bytes | None) -> str | None:
    return None if blob is None else blob.decode("utf-8", "surrogatepass")


def _waiting_job(raw: str) -> Job:
    """A duplicate line kept while its first line is in flight: its own URL, place,
    name and extra columns (its record carries its own line's columns)."""
    url, label, line, name, extra = json.loads(raw)
    return Job(url=url, input=label, line=line, name=name, extra=extra)


class Duplicates:
    """Decides, line by line, whether a job is the first of its URL in this run."""

    @classmethod
    def for_run(
        cls,
        path: Path,
        record: Callable[[Outcome], None],
        settings: Settings,
        case_blind: Callable[[], bool],
    ) -> Duplicates:
        """The rules of a run with these settings: a real run and a dry run both build
        theirs here, so the dry run counts what the run would do. Names are checked
        for collisions only where two URLs can get the same one; ``case_blind`` (asked
        only then) tells whether the output folder's file system ignores case."""
        # Imported here: storage pulls in aiofiles, which `imgdl --help` need not load.
        from downloader.storage import names_may_collide, stem_for

        template = settings.output.name_template
        check_names = names_may_collide(template, settings.input.name_column)
        return cls(
            path,
            record,
            functools.partial(stem_for, template=template) if check_names else None,
            fold_case=check_names and case_blind(),
        )

    def __init__(
        self,
        path: Path,
        record: Callable[[Outcome], None],
        stem_of: Callable[[Job], str] | None = None,
        fold_case: bool = False,
    ) -> None:
        path.unlink(missing_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.executescript(
            f"""
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -{_CACHE_KIB};
            CREATE TABLE first (
                h INTEGER PRIMARY KEY, h2 INTEGER NOT NULL, label INTEGER NOT NULL,
                line INTEGER NOT NULL
            );
            CREATE TABLE done (
                k INTEGER PRIMARY KEY, status TEXT NOT NULL, reason TEXT,
                http_status INTEGER, error BLOB, path BLOB
            );
            CREATE TABLE waiting (h INTEGER NOT NULL, job TEXT NOT NULL);
            CREATE TABLE stem (stem TEXT PRIMARY KEY, h INTEGER NOT NULL, line TEXT NOT NULL);
            CREATE INDEX waiting_h ON waiting (h);
            BEGIN;
            """
        )
        self._record = record
        self._stem_of = stem_of
        self._fold_case = fold_case
        self._ops = 0
        self._waited_on = LineSet()
        self._maybe_seen = bytearray(_BITMAP_BITS // 8)
        #: new URLs not yet in the table: inserted together, before the next query
        self._new: list[tuple[int, int, int, int]] = []
        #: a number per input label (the tables hold numbers, see ``_line_key``)
        self._labels: dict[str, int] = {}
        self._label_of: list[str] = []
        self.found = 0

    def _tick(self, ops: int = 1) -> None:
        self._ops += ops
        if self._ops >= _COMMIT_EVERY:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._ops = 0

    def _label_number(self, label: str) -> int:
        """The number of an input label. A label (a path from the command line) may
        hold lone surrogates, which SQLite's text cannot."""
        number = self._labels.get(label)
        if number is None:
            number = self._labels[label] = len(self._label_of)
            self._label_of.append(label)
        return number

    def _line_key(self, label: str, line: int) -> int:
        """A line's key in ``done``: its input's number, then its line number."""
        return (self._label_number(label) << _LINE_BITS) | line

    def _insert_new(self) -> None:
        """One ``executemany`` for the new URLs so far: a statement per line was the
        parent's largest cost (issue 5's profile)."""
        if self._new:
            self._db.executemany(
                "INSERT INTO first (h, h2, label, line) VALUES (?, ?, ?, ?)", self._new
            )
            self._new = []

    def admit(self, job: Job) -> bool:
        """True if the job is to be fetched; False if it is a duplicate (recorded here or later)."""
        h, h2 = _keys(job.url)
        self._tick()
        bit = h & _BITMAP_MASK
        row = None
        if self._maybe_seen[bit >> 3] & (1 << (bit & 7)):  # else surely new: one query saved
            self._insert_new()
            row = self._db.execute("SELECT h2, label, line FROM first WHERE h = ?", (h,)).fetchone()
        if row is None:
            self._maybe_seen[bit >> 3] |= 1 << (bit & 7)
            self._new.append((h, h2, self._label_number(job.input), job.line))
            if len(self._new) >= _INSERT_BATCH:
                self._insert_new()
            return self._name_is_free(job, h)
        if row[0] != h2:  # two URLs share 64 bits: fetch it, names differ anyway
            return self._name_is_free(job, h)
        self.found += 1
        label, line = self._label_of[row[1]], row[2]
        done = self._db.execute(
            "SELECT status, reason, http_status, error, path FROM done WHERE k = ?",
            (self._line_key(label, line),),
        ).fetchone()
        if done is not None:  # the first line's outcome is known
            status, reason, http_status, error, path = done
            first = First(label, line, status, reason, http_status, _text(error), _text(path))
            self._record(resolve(job, first))
        else:
            self._db.execute(
                "INSERT INTO waiting (h, job) VALUES (?, ?)",
                (h, json.dumps([job.url, job.input, job.line, job.name, job.extra])),
            )
            self._waited_on.add((label, line))
        return False

    def _name_is_free(self, job: Job, h: int) -> bool:
        """With names from a column or template, two URLs may get the same name: the
        first line keeps it, a later one fails at once as ``name_collision``."""
        if self._stem_of is None:
            return True
        try:
            stem = self._stem_of(job)
        except UnsafeNameError:
            return True  # the worker records invalid_name
        where = f"{job.input}:{job.line}"
        key = stem.casefold() if self._fold_case else stem
        self._tick()
        if self._db.execute(
            "INSERT OR IGNORE INTO stem (stem, h, line) VALUES (?, ?, ?)", (key, h, where)
        ).rowcount:
            return True
        (owner,) = self._db.execute("SELECT line FROM stem WHERE stem = ?", (key,)).fetchone()
        # This line is not fetched: a later line with its URL (and a free name) is the first.
        self._insert_new()
        self._db.execute("DELETE FROM first WHERE h = ?", (h,))
        self._record(
            Outcome.not_saved(
                job,
                Reason.NAME_COLLISION,
                error=f"the name {stem!r} is taken by {owner}, a different URL",
            )
        )
        return False

    def claim_name(self, job: Job) -> None:
        """A line done by an earlier run keeps its name: a different URL cannot take it."""
        if self._stem_of is None:
            return
        try:
            stem = self._stem_of(job)
        except UnsafeNameError:
            return
        key = stem.casefold() if self._fold_case else stem
        self._tick()
        self._db.execute(
            "INSERT OR IGNORE INTO stem (stem, h, line) VALUES (?, ?, ?)",
            (key, _keys(job.url)[0], f"{job.input}:{job.line}"),
        )

    def finished(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Fetched lines' records (decoded JSON, or ``Outcome.to_dict``): remember what a
        later line with the same URL needs (``First``), and record the duplicates
        waiting for them.

        Kept by line, not by URL: the keys come without hashing the URL again, and a
        shard's lines are mostly in order, so the rows go to the end of the table (an
        UPDATE of the URL's row took 6 µs a line in a run, with the hash; issue 5).
        """
        line_key = self._line_key
        self._db.executemany(
            "INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    line_key(r["input"], r["line"]),
                    r["status"],
                    r["reason"],
                    r["http_status"],
                    _blob(r["error"]),
                    _blob(r["path"]),
                )
                for r in records
            ],
        )
        self._tick(len(records))
        waited_on = self._waited_on
        if not waited_on:  # no line waits for a first one: nothing to look up
            return
        for record in records:
            if (record["input"], record["line"]) not in waited_on:
                continue
            first = First(
                record["input"],
                record["line"],
                record["status"],
                record["reason"],
                record["http_status"],
                record["error"],
                record["path"],
            )
            h = _keys(record["url"])[0]
            rows = self._db.execute("SELECT job FROM waiting WHERE h = ?", (h,)).fetchall()
            for (raw,) in rows:
                self._record(resolve(_waiting_job(raw), first))
            self._db.execute("DELETE FROM waiting WHERE h = ?", (h,))

    def discard(self) -> None:
        """Close without recording the lines still waiting (a dry run, whose first lines
        never get an outcome): ``close`` would load them all to record them."""
        self._db.execute("COMMIT")
        self._db.close()

    def close(self) -> None:
        """Duplicates whose first line never got an outcome (a stopped run) are interrupted."""
        for (raw,) in self._db.execute("SELECT job FROM waiting").fetchall():
            job = _waiting_job(raw)
            self._record(Outcome.not_saved(job, Reason.INTERRUPTED, error="first line not done"))
        self._db.execute("COMMIT")
        self._db.close()
