"""Content dedupe: which images this output folder already holds, by content.

One SQLite file in WAL mode, ``OUTDIR/.imgdl/content.sqlite`` (for an s3://
output, in the local state folder), shared by every worker process of a run and
kept from run to run. Its size grows with the number of images stored (about 100
bytes each, plus 16 per band with pHashes), never the memory: each process keeps a
2 MiB page cache.

A row is *claimed* before its image is put in place and *confirmed* after, in
two steps, so that two workers that got the same bytes at the same moment cannot
both store them, and a crash between the steps cannot leave a duplicate pointing
at nothing:

1. ``claim`` (one ``BEGIN IMMEDIATE`` transaction: SQLite serialises writers
   across processes): a confirmed row with the same sha256, or a pHash within
   ``max_distance``, whose file is still there → the caller records
   ``duplicate_content``; a claimed, unconfirmed row of a live process → wait
   and ask again; none → insert our claim (pid, time).
2. the caller commits the file, then ``confirm``; if the commit fails, ``release``
   deletes the claim.

Duplicates are only ever pointed at confirmed rows, whose file was committed
first. A claim left by a killed process (its pid gone, or older than
``STALE_SECONDS``) is settled when found: confirmed if the file it names is
there (the kill came between the commit and ``confirm``), deleted otherwise. The
parent settles all of them when a run starts (:func:`settle`).

Near duplicates: a 64-bit pHash is cut into ``max_distance + 1`` bands; two
hashes within that Hamming distance agree on at least one band entirely
(pigeonhole), so a lookup reads the rows sharing one of its bands through an
index and compares only those.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from downloader.state import STATE_DIR

CONTENT_DB = f"{STATE_DIR}/content.sqlite"
#: An unconfirmed claim older than this is a killed process's, whatever its pid says
#: (pids are reused).
STALE_SECONDS = 600.0
_CACHE_KIB = 2 * 1024
_BUSY_SECONDS = 60.0
_SCHEMA = """
CREATE TABLE IF NOT EXISTS content (
    sha256 BLOB PRIMARY KEY,
    phash INTEGER,
    path TEXT NOT NULL,
    owner TEXT NOT NULL,
    pid INTEGER,
    claimed REAL,
    done INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS band (
    k INTEGER NOT NULL, v INTEGER NOT NULL, sha256 BLOB NOT NULL,
    PRIMARY KEY (k, v, sha256)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS content_path ON content (path);
"""


def _signed(value: int) -> int:
    """A 64-bit hash as SQLite's signed INTEGER."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def bands(phash: int, count: int) -> list[tuple[int, int]]:
    """``count`` (band number, value) pairs covering the 64 bits: two hashes within
    distance ``count - 1`` share at least one pair."""
    edges = [round(64 * i / count) for i in range(count + 1)]
    # _signed: with one band (max_distance 0) the value is all 64 bits
    return [
        (k, _signed((phash >> edges[k]) & ((1 << (edges[k + 1] - edges[k])) - 1)))
        for k in range(count)
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    """An image stored earlier that this one duplicates."""

    path: str
    owner: str  # "input:line" of the line that stored it
    distance: int  # Hamming distance of the pHashes; 0 for the same bytes
    exact: bool  # the same bytes (sha256)


class Busy:
    """Another download of the same image is between its claim and its commit."""


BUSY = Busy()


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ContentIndex:
    """One process's connection to the content table (thread-safe: the image threads
    use it)."""

    def __init__(
        self,
        path: Path,
        max_distance: int | None,
        exists: Callable[[str], bool],
    ) -> None:
        """``max_distance`` None: exact matches only. ``exists(relpath)``: is that
        image still stored?"""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            path, timeout=_BUSY_SECONDS, isolation_level=None, check_same_thread=False
        )
        self._set_up()
        self._lock = threading.Lock()
        self._bands = None if max_distance is None else max_distance + 1
        self._max = max_distance or 0
        self._exists = exists
        self._pid = os.getpid()

    def _set_up(self) -> None:
        """WAL mode and the schema. Two processes doing this at once on a new file can
        get "database is locked" at once, without SQLite's busy wait (switching to WAL
        takes an exclusive lock): ask again for up to the busy timeout. The parent
        creates the file before the workers start (``settle``), so this is rare."""
        deadline = time.monotonic() + _BUSY_SECONDS
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
                self._db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def claim(self, sha256: str, phash: int | None, path: str, owner: str) -> Match | Busy | None:
        """None: this image is new and now claimed for ``path``; a Match: stored
        before; BUSY: being stored right now by another download (ask again)."""
        key = bytes.fromhex(sha256)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._find(key, phash, owner, path)
                if found is None:
                    self._insert(key, phash, path, owner)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return found

    def _find(
        self, key: bytes, phash: int | None, claimer: str, claim_path: str
    ) -> Match | Busy | None:
        row = self._db.execute(
            "SELECT path, owner, pid, claimed, done FROM content WHERE sha256 = ?", (key,)
        ).fetchone()
        if row is not None:
            path, owner, pid, claimed, done = row
            if owner == claimer and path == claim_path:
                # an attempt at this very line and URL, killed: it is ours (the same
                # line of an edited list with another URL is not)
                return None
            found = self._check(key, path, owner, pid, claimed, done, distance=0, exact=True)
            if found is not None:
                return found
        if phash is None or self._bands is None:
            return None
        nearest: tuple[int, bytes, tuple[str, str, int | None, float | None, int]] | None = None
        for k, v in bands(phash, self._bands):
            for sha, other, *rest in self._db.execute(
                "SELECT c.sha256, c.phash, c.path, c.owner, c.pid, c.claimed, c.done "
                "FROM band b JOIN content c ON c.sha256 = b.sha256 WHERE b.k = ? AND b.v = ?",
                (k, v),
            ):
                d = (phash ^ _unsigned(other)).bit_count()
                if d <= self._max and (nearest is None or d < nearest[0]):
                    nearest = (d, sha, (rest[0], rest[1], rest[2], rest[3], rest[4]))
        if nearest is None:
            return None
        d, sha, (path, owner, pid, claimed, done) = nearest
        return self._check(sha, path, owner, pid, claimed, done, distance=d, exact=False)

    def _check(
        self,
        key: bytes,
        path: str,
        owner: str,
        pid: int | None,
        claimed: float | None,
        done: int,
        distance: int,
        exact: bool,
    ) -> Match | Busy | None:
        """A row found: a match, busy, or (gone stale: settled here) nothing."""
        if not done and _alive(pid) and time.time() - (claimed or 0) < STALE_SECONDS:
            return BUSY
        if self._exists(path):
            if not done:  # killed between its commit and its confirm: it is stored
                self._db.execute("UPDATE content SET done = 1, pid = NULL WHERE sha256 = ?", (key,))
            return Match(path, owner, distance, exact)
        self._delete(key)  # the file is gone (or never came): forget it
        return None

    def _insert(self, key: bytes, phash: int | None, path: str, owner: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO content (sha256, phash, path, owner, pid, claimed, done) "
            "VALUES (?, ?, ?, ?, ?, ?, 0)",
            (key, None if phash is None else _signed(phash), path, owner, self._pid, time.time()),
        )
        if phash is not None and self._bands is not None:
            self._db.executemany(
                "INSERT OR IGNORE INTO band (k, v, sha256) VALUES (?, ?, ?)",
                [(k, v, key) for k, v in bands(phash, self._bands)],
            )

    def _delete(self, key: bytes) -> None:
        self._db.execute("DELETE FROM content WHERE sha256 = ?", (key,))
        self._db.execute("DELETE FROM band WHERE sha256 = ?", (key,))

    def confirm(self, sha256: str, path: str) -> None:
        """The claimed image is stored at ``path``: later copies may point at it."""
        with self._lock:
            self._db.execute(
                "UPDATE content SET done = 1, pid = NULL, path = ? WHERE sha256 = ?",
                (path, bytes.fromhex(sha256)),
            )

    def forget_path(self, path: str) -> None:
        """Drop the rows of the image stored at ``path`` (replaced by other bytes)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            keys = [
                k for (k,) in self._db.execute("SELECT sha256 FROM content WHERE path = ?", (path,))
            ]
            for key in keys:
                self._delete(key)
            self._db.execute("COMMIT")

    def release(self, sha256: str) -> None:
        """The claimed image was not stored after all: the next copy is the first."""
        key = bytes.fromhex(sha256)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            gone = self._db.execute(
                "DELETE FROM content WHERE sha256 = ? AND done = 0 AND pid = ?", (key, self._pid)
            ).rowcount
            if gone:
                self._db.execute("DELETE FROM band WHERE sha256 = ?", (key,))
            self._db.execute("COMMIT")


def settle(path: Path, max_distance: int | None, exists: Callable[[str], bool]) -> dict[str, int]:
    """At the start of a run (no worker yet): claims left by killed processes are
    confirmed if their file is there, deleted otherwise; the pHash bands are rebuilt
    if ``max_distance`` changed since the last run. Returns what was done."""
    index = ContentIndex(path, max_distance, exists)  # created here, before the workers
    db = index._db
    counts = {"confirmed": 0, "dropped": 0, "rebanded": 0}
    db.execute("BEGIN IMMEDIATE")
    pending = db.execute("SELECT sha256, path, pid, claimed FROM content WHERE done = 0")
    for key, relpath, pid, claimed in pending.fetchall():
        if _alive(pid) and time.time() - (claimed or 0) < STALE_SECONDS:
            continue  # another task of a split job, running in the same folder
        if exists(relpath):
            db.execute("UPDATE content SET done = 1, pid = NULL WHERE sha256 = ?", (key,))
            counts["confirmed"] += 1
        else:
            index._delete(key)
            counts["dropped"] += 1
    wanted = "" if max_distance is None else str(max_distance + 1)
    row = db.execute("SELECT value FROM meta WHERE key = 'bands'").fetchone()
    if wanted and (row is None or row[0] != wanted):
        db.execute("DELETE FROM band")
        rows = db.execute("SELECT sha256, phash FROM content WHERE phash IS NOT NULL").fetchall()
        for key, phash in rows:
            db.executemany(
                "INSERT OR IGNORE INTO band (k, v, sha256) VALUES (?, ?, ?)",
                [(k, v, key) for k, v in bands(_unsigned(phash), int(wanted))],
            )
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('bands', ?)", (wanted,))
        counts["rebanded"] = len(rows)
    db.execute("COMMIT")
    index.close()
    return counts
