"""The run's state on disk, ``OUTDIR/.imgdl/``: what lets a killed run be finished.

Layout::

    .imgdl/run.json            the inputs of the job: name, size and sha256 of each
    .imgdl/segments/N.jsonl    outcome records, append-only, one file per run
    .imgdl/journal/*.jsonl     per-shard journals written by the workers
    .imgdl/parts/<pid>/        bodies being downloaded
    .imgdl/dedupe.sqlite       URLs seen in this run (see dedupe.py)

How the manifest survives a crash: the parent appends every outcome to the
current run's segment as soon as it has it (a shard's journal is copied there
when the shard ends), and only at the end of a run merges all segments and the
previous ``manifest.jsonl`` into a new manifest (``os.replace``, so a kill
during the merge leaves the old one). A run killed with ``kill -9`` leaves its
segment and the journals of the shards in flight; the next run folds those
journals into a segment, reads every record, and does not do again a line
whose newest record is saved or skipped and whose file is still there.

Lines are matched by input name and line number, which is only sound if the
input is the same list: ``run.json`` keeps each input's size and sha256, and a
run whose inputs are not the same lists (or extend them: appending lines is
fine) as the previous one's starts a new manifest and moves the old records to
``OUTDIR/previous-runs/<time>/``. Standard input cannot be checked, so a run
reading ``-`` always starts a new manifest (files already on disk are still
found by name and not fetched again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from downloader.errors import ImgdlError
from downloader.objstore import is_s3
from downloader.outcomes import FIELDS, Outcome, Reason, Status
from downloader.sources import STDIN

STATE_DIR = ".imgdl"
ARCHIVE_DIR = "previous-runs"
#: One folder of records per task of a job split by an orchestrator (see tasks.py).
TASKS_DIR = "tasks"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.txt"
SUMMARY = "summary.json"
#: imgdl report's page (htmlreport.py), kept with the records it was made from
REPORT_HTML = "report.html"
_HASH_BLOCK = 1 << 20


class LineSet:
    """A set of (input, line) pairs in one bit per line: 10 million lines take 1.25 MB."""

    def __init__(self) -> None:
        self._bits: dict[str, bytearray] = {}

    def add(self, key: tuple[str, int]) -> None:
        label, line = key
        bits = self._bits.setdefault(label, bytearray())
        byte = line >> 3
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))
        bits[byte] |= 1 << (line & 7)

    def __contains__(self, key: tuple[str, int]) -> bool:
        label, line = key
        bits = self._bits.get(label)
        byte = line >> 3
        return bits is not None and byte < len(bits) and bool(bits[byte] & (1 << (line & 7)))

    def __len__(self) -> int:
        return sum(int.from_bytes(bits, "little").bit_count() for bits in self._bits.values())

    def __bool__(self) -> bool:
        """Holds any line? (Without counting them, as ``len`` would.)"""
        return bool(self._bits)


def _sha256(path: str, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            block = handle.read(_HASH_BLOCK if remaining is None else min(_HASH_BLOCK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def fingerprint(label: str) -> dict[str, Any] | None:
    """Size and sha256 of an input file; None for what cannot be read twice (stdin, pipes)."""
    if label == STDIN or is_s3(label) or not stat.S_ISREG(os.stat(label).st_mode):
        return None
    return {"input": label, "size": os.path.getsize(label), "sha256": _sha256(label)}


def _ends_a_line(label: str, size: int) -> bool:
    """Was the old end of the file the end of a line? Else appending changed its last line."""
    if size == 0:
        return True
    with open(label, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


def _same_lists(previous: list[dict[str, Any]], current: list[dict[str, Any]]) -> bool:
    """True if the current inputs (fingerprinted) are the previous run's, each the same
    list or an extension of it."""
    if [p.get("input") for p in previous] != [c["input"] for c in current]:
        return False
    for old, new in zip(previous, current, strict=True):
        if "sha256" not in old or "sha256" not in new:  # stdin or a pipe: not checkable
            return False
        if new["size"] == old["size"]:  # the common case: the hash is already at hand
            if new["sha256"] != old["sha256"]:
                return False
            continue
        try:
            label = new["input"]
            if new["size"] < old["size"] or _sha256(label, old["size"]) != old["sha256"]:
                return False
            if not _ends_a_line(label, old["size"]):
                return False
        except OSError:
            return False
    return True


def read_lines(path: Path) -> Iterator[tuple[Outcome, str]]:
    """Records of a segment, journal or manifest, each with its JSON text; a torn last
    line (a kill) or a foreign one is skipped. The text is passed on as it is: a record
    is encoded once, by the worker, not again by the parent for the segment and for the
    manifest."""
    for raw, text in read_raw(path):
        yield Outcome.from_dict(raw), text


def read_raw(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """Like ``read_lines``, but the records as decoded JSON (the final merge builds no
    Outcome). A record written by an older version (fewer fields) comes out with every
    field, re-encoded, so that the manifest's columns stay the same on every line."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    raw = Outcome.decode(line)
                except ValueError:
                    continue
                if not _well_formed(raw):
                    continue
                if raw.keys() == FIELDS:
                    yield raw, line.rstrip("\n")
                    continue
                try:
                    outcome = Outcome.from_dict(raw)
                except (ValueError, TypeError, KeyError):  # a field this version lacks
                    continue
                yield outcome.to_dict(), outcome.to_json()
    except FileNotFoundError:
        return


_RECORD_KEYS = frozenset({"input", "line", "url", "status"})
_STATUSES = frozenset(Status)
_REASONS = frozenset(Reason)


def _well_formed(raw: Any) -> bool:
    """What a torn or foreign line would get wrong; the rest is the worker's own JSON."""
    if not (isinstance(raw, dict) and raw.keys() >= _RECORD_KEYS):
        return False
    status, reason = raw["status"], raw.get("reason")
    return (
        isinstance(raw["input"], str)
        and isinstance(raw["line"], int)
        and isinstance(raw["url"], str)
        and isinstance(status, str)
        and status in _STATUSES
        and (reason is None or (isinstance(reason, str) and reason in _REASONS))
    )


#: The fields of a saved image that a 304 (not_modified) leaves as they were.
KEPT_BY_NOT_MODIFIED = ("bytes", "sha256", "content_type", "width", "height", "final_url")


class Validators:
    """ETag / Last-Modified / path of the lines an earlier run saved, on disk (SQLite)."""

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.executescript(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
            "CREATE TABLE v (input TEXT, line INTEGER, etag TEXT, modified TEXT, path TEXT,"
            " record TEXT, PRIMARY KEY (input, line)); BEGIN;"
        )

    def add(self, outcome: Outcome) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO v VALUES (?, ?, ?, ?, ?, ?)",
            (
                outcome.input,
                outcome.line,
                outcome.etag,
                outcome.last_modified,
                outcome.path,
                outcome.to_json(),
            ),
        )

    def kept(self, outcome: Outcome) -> Outcome:
        """A 304's record with what it kept: the file's size, hash, type and dimensions
        (and where it came from), from the record of the run that saved it."""
        row = self._db.execute(
            "SELECT record FROM v WHERE input = ? AND line = ?", (outcome.input, outcome.line)
        ).fetchone()
        if row is None:
            return outcome
        before = Outcome.decode(row[0])
        return dataclasses.replace(
            outcome, **{name: before.get(name) for name in KEPT_BY_NOT_MODIFIED}
        )

    def get(self, label: str, line: int) -> tuple[str | None, str | None, str] | None:
        row = self._db.execute(
            "SELECT etag, modified, path FROM v WHERE input = ? AND line = ?", (label, line)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("COMMIT")
        self._db.close()


def _nonempty_file(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def new_archive_folder(outdir: Path) -> Path:
    """A new folder under OUTDIR/previous-runs/, never one that exists (two runs a second)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    (outdir / ARCHIVE_DIR).mkdir(exist_ok=True)
    for n in range(1000):
        target = outdir / ARCHIVE_DIR / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise ImgdlError(f"cannot make a new folder in {outdir / ARCHIVE_DIR}")


class RunState:
    """Opens the state of OUTDIR for a run: recovers, decides what is done, appends records."""

    def __init__(
        self,
        outdir: Path,
        images: Path | None = None,
        exists: Callable[[str], bool] | None = None,
    ) -> None:
        """``outdir`` holds the records; ``images`` the images they name (the same
        folder, except for one task of a split job: OUTDIR/tasks/<task>/ and OUTDIR).
        ``exists``: is the image of a record still there, by its relative name, where
        that is not a file below ``images`` (an object store's listing)."""
        self.outdir = outdir
        self.images = images if images is not None else outdir
        self._exists = exists or (lambda relpath: _nonempty_file(self.images / relpath))
        self.dir = outdir / STATE_DIR
        self.journal_dir = self.dir / "journal"
        self.segments_dir = self.dir / "segments"
        self.parts_dir = self.dir / "parts"
        self._segment: IO[str] | None = None
        #: this run's segment (see sole_segment)
        self.segment_path: Path | None = None
        #: this run's refetchable URLs, written as its records come (see report.RunTally)
        self.failures_part = self.dir / "failures.part"
        self.archived: Path | None = None
        self._lock_file: IO[str] | None = None
        self.validators: Validators | None = None

    # -- start -----------------------------------------------------------------------

    def open(
        self,
        labels: list[str],
        revalidate: bool = False,
        known: Mapping[str, dict[str, Any]] | None = None,
    ) -> LineSet:
        """Prepare OUTDIR for a run over ``labels``; returns the lines already done.

        With ``revalidate``, ``self.validators`` then holds the ETag/Last-Modified of
        every done line that has them. ``known``: fingerprints of inputs that are not
        local files (an s3:// list's size and ETag), by label.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        # Before anything moves: an input may be this folder's own failures.txt.
        known = known or {}
        inputs = [known.get(label) or fingerprint(label) or {"input": label} for label in labels]
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.segments_dir.mkdir(exist_ok=True)
        self._recover_journals()
        if revalidate:
            self.validators = Validators(self.dir / "validators.sqlite")
        previous = self._read_run_json()
        has_records = (self.outdir / MANIFEST).exists() or any(self.segments_dir.iterdir())
        if has_records and previous is not None and _same_lists(previous, inputs):
            done = self._done_lines()
        else:
            if has_records:
                self._archive(labels)
            done = LineSet()
        self._write_run_json(inputs)
        self.journal_dir.mkdir(exist_ok=True)
        self.segment_path = self._new_segment()
        self._segment = open(self.segment_path, "a", encoding="utf-8")  # noqa: SIM115
        return done

    def _lock(self) -> None:
        """One run per OUTDIR at a time: a second one would delete the first one's state."""
        self._lock_file = open(self.dir / "lock", "a")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ImgdlError(
                f"another imgdl run is using the output folder {self.outdir}"
            ) from None

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _new_segment(self) -> Path:
        numbers = [int(p.stem) for p in self.segments_dir.glob("*.jsonl") if p.stem.isdigit()]
        return self.segments_dir / f"{max(numbers, default=0) + 1:08d}.jsonl"

    def _recover_journals(self) -> None:
        """Journals left by a killed run hold finished outcomes: keep them in a segment."""
        journals = sorted(self.journal_dir.glob("*.jsonl")) if self.journal_dir.exists() else []
        if journals:
            with open(self._new_segment(), "a", encoding="utf-8") as segment:
                for journal in journals:
                    for _, text in read_raw(journal):
                        segment.write(text + "\n")
        shutil.rmtree(self.journal_dir, ignore_errors=True)

    def _read_run_json(self) -> list[dict[str, Any]] | None:
        try:
            data = json.loads((self.dir / "run.json").read_text(encoding="utf-8"))
            inputs = data["inputs"]
            return inputs if isinstance(inputs, list) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_run_json(self, inputs: list[dict[str, Any]]) -> None:
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps({"version": 1, "inputs": inputs}, indent=1), encoding="utf-8")
        tmp.replace(self.dir / "run.json")

    def _done_lines(self) -> LineSet:
        """Lines whose newest record is saved or skipped, with the file still on disk."""
        done, seen = LineSet(), LineSet()
        for outcome in self.records():
            key = (outcome.input, outcome.line)
            if key in seen:
                continue
            seen.add(key)
            if outcome.status is Status.FAILED:
                continue
            if outcome.path is None or self._exists(outcome.path):
                done.add(key)
                if (
                    self.validators is not None
                    and outcome.path
                    and (outcome.etag or outcome.last_modified)
                ):
                    self.validators.add(outcome)
        return done

    def _archive(self, labels: list[str]) -> None:
        """Records of a different job: merge them and move them aside, never delete them.

        A file that is an input of this run (``OUTDIR/failures.txt`` fed back in) is
        copied, not moved: if this run is killed, the same command must find it.
        """
        from downloader.report import compact  # report depends on this module

        compact(self, summary_extra={"archived": True})
        target = self._archive_folder()
        inputs = {os.path.realpath(label) for label in labels if label != STDIN}
        for name in (MANIFEST, FAILURES, SUMMARY, REPORT_HTML):  # the page describes them
            source = self.outdir / name
            with contextlib.suppress(FileNotFoundError):
                if os.path.realpath(source) in inputs:
                    shutil.copy2(source, target / name)
                else:
                    source.replace(target / name)
        self.archived = target

    def _archive_folder(self) -> Path:
        return new_archive_folder(self.outdir)

    # -- during the run --------------------------------------------------------------

    def append(self, outcome: Outcome, text: str | None = None) -> None:
        """``text``: the record's JSON as the worker wrote it, if there is one."""
        assert self._segment is not None
        self._segment.write((text or outcome.to_json()) + "\n")

    def append_text(self, text: str) -> None:
        """A record's JSON text as the worker wrote it."""
        assert self._segment is not None
        self._segment.write(text + "\n")

    def flush(self) -> None:
        if self._segment is not None:
            self._segment.flush()

    # -- the end -----------------------------------------------------------------------

    def records(self) -> Iterator[Outcome]:
        """Every record, newest first: segments from the last, then the old manifest."""
        for segment in self._record_files():
            for outcome, _ in read_lines(segment):
                yield outcome

    def raw_records(self) -> Iterator[tuple[dict[str, Any], str]]:
        """``records`` as decoded JSON with its text, for the merge."""
        for segment in self._record_files():
            yield from read_raw(segment)

    def _record_files(self) -> list[Path]:
        return [*sorted(self.segments_dir.glob("*.jsonl"), reverse=True), self.outdir / MANIFEST]

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None

    def sole_segment(self) -> Path | None:
        """This run's segment, if it holds every record there is: no other segment (a
        killed run's journals are folded into one of their own) and no manifest. Then
        the merge would only copy it (see report.RunTally)."""
        if self.segment_path is None or (self.outdir / MANIFEST).exists():
            return None
        if list(self.segments_dir.glob("*.jsonl")) != [self.segment_path]:
            return None
        return self.segment_path

    def merged(self) -> None:
        """The segments are in the manifest now: drop them and the scratch folders."""
        self.close()
        for path in sorted(self.segments_dir.glob("*.jsonl")):  # oldest first: a kill
            path.unlink()  # midway leaves a newest suffix, which agrees with the manifest
        for folder in (self.journal_dir, self.parts_dir):
            shutil.rmtree(folder, ignore_errors=True)
        if self.validators is not None:
            self.validators.close()
        for scratch in ("dedupe.sqlite", "validators.sqlite", self.failures_part.name):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / scratch).unlink()
