"""The run's written record: manifest, failures file, summary, exit status.

Only the parent writes these. During a run every outcome goes to the run's
segment in ``OUTDIR/.imgdl`` (see ``state.py``); at the end :func:`compact`
merges all records, newest first, into ``manifest.jsonl`` (exactly one record
per input line) and ``failures.txt``, both through a temporary file and
``os.replace``. That also makes it safe to feed ``OUTDIR/failures.txt`` back in
as the input of a run into the same OUTDIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from downloader.dedupe import Duplicates
from downloader.outcomes import REFETCHABLE, Job, Outcome, Reason, Status
from downloader.state import FAILURES, MANIFEST, SUMMARY, LineSet, RunState

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def refetchable(record: Mapping[str, Any]) -> bool:
    """Does this record's URL go to failures.txt? (A duplicate's URL is its first line's.)"""
    return record.get("reason") in REFETCHABLE and record.get("duplicate_of") is None


@dataclasses.dataclass
class Totals:
    """Counts over the merged manifest."""

    by_status: Counter[str] = dataclasses.field(default_factory=Counter)
    by_reason: Counter[str] = dataclasses.field(default_factory=Counter)
    http_errors: Counter[int] = dataclasses.field(default_factory=Counter)
    bytes: int = 0
    refetchable: int = 0
    #: records of a line that had one already (the newest comes first: it wins)
    repeated: int = 0

    @property
    def lines(self) -> int:
        return sum(self.by_status.values())

    def add(self, record: Mapping[str, Any]) -> bool:
        """Count one manifest record, as decoded JSON (the merge builds no Outcome: 7 µs
        each, on the path between the last download and the exit); returns whether its
        URL is one to fetch again (``refetchable``)."""
        reason = record.get("reason")
        self.by_status[record["status"]] += 1
        if reason is not None:
            self.by_reason[reason] += 1
        if reason == Reason.HTTP_ERROR and record.get("http_status") is not None:
            self.http_errors[record["http_status"]] += 1
        if record["status"] == Status.SAVED or reason == Reason.NOT_MODIFIED:  # on disk
            self.bytes += record.get("bytes") or 0
        if refetchable(record):
            self.refetchable += 1
            return True
        return False


class RunTally:
    """This run's records counted as they are appended, so that the common end of a
    run, into a folder that held no records, needs no merge.

    The merge (``compact``) reads every record back and decodes it at the end: about
    150 ms for 20,000 records, between the last download and the exit. When this
    run's segment is the only record file (``RunState.sole_segment``) and no line
    was recorded twice, the manifest the merge would write is that segment, byte
    for byte: ``publish`` renames it into place and the failures file, written
    line by line as the records came, beside it. Otherwise ``compact`` runs as
    before. A kill leaves the segment as the source of truth either way; the part
    file of failures is scratch, rewritten by the next run.
    """

    def __init__(self, failures_part: Path) -> None:
        self.totals = Totals()
        self._seen = LineSet()
        self.repeated = False
        self._path = failures_part
        self._failures: TextIO | None = open(failures_part, "w", encoding="utf-8")  # noqa: SIM115

    def add(self, outcome: Outcome) -> None:
        """Count a record the parent made itself."""
        self.add_record(outcome.to_dict())

    def add_record(self, record: Mapping[str, Any]) -> None:
        """Count a record as decoded JSON (a worker's, as the journal holds it)."""
        if self.repeated:
            return
        key = (record["input"], record["line"])
        if key in self._seen:  # the merge would keep the first: leave it to the merge
            self.repeated = True
            self.close()
            return
        self._seen.add(key)
        if self.totals.add(record) and self._failures is not None:
            self._failures.write(record["url"] + "\n")

    def close(self) -> None:
        if self._failures is not None:
            self._failures.close()
            self._failures = None

    def publish(self, state: RunState, unread: Iterable[str]) -> Totals | None:
        """The manifest and failures file of a run that is the folder's only one; None
        (nothing done) when the merge is needed."""
        segment = state.sole_segment()
        if self.repeated or self._failures is None or segment is None:
            self.close()
            return None
        for url in unread:
            self._failures.write(url + "\n")
            self.totals.refetchable += 1
        self.close()
        os.replace(segment, state.outdir / MANIFEST)
        os.replace(self._path, state.outdir / FAILURES)
        state.merged()
        return self.totals


def compact(
    state: RunState,
    summary_extra: dict[str, Any] | None = None,
    unread: Iterable[str] = (),
) -> Totals:
    """Merge every record into ``manifest.jsonl`` and ``failures.txt``; return the counts.

    ``unread`` are URLs of an input that this run did not get to and that would be
    lost from the retry cycle otherwise (the input was this folder's failures.txt).
    """
    totals = write_records(state.outdir, state.raw_records(), unread)
    if summary_extra is not None:
        write_summary(state.outdir, {**counts_of(totals), **summary_extra})
    state.merged()
    return totals


def write_records(
    outdir: Path, records: Iterable[tuple[dict[str, Any], str]], unread: Iterable[str] = ()
) -> Totals:
    """Write ``manifest.jsonl`` (the first record of each line) and ``failures.txt``
    in ``outdir``, each replaced at once when complete; the counts, with the later
    records of a line already written in ``totals.repeated``."""
    totals = Totals()
    seen = LineSet()
    manifest_tmp = outdir / (MANIFEST + ".tmp")
    failures_tmp = outdir / (FAILURES + ".tmp")
    with (
        open(manifest_tmp, "w", encoding="utf-8") as manifest,
        open(failures_tmp, "w", encoding="utf-8") as failures,
    ):
        for record, text in records:
            key = (record["input"], record["line"])
            if key in seen:
                totals.repeated += 1
                continue
            seen.add(key)
            manifest.write(text + "\n")
            if refetchable(record):
                failures.write(record["url"] + "\n")
            totals.add(record)
        for url in unread:
            failures.write(url + "\n")
            totals.refetchable += 1
    os.replace(manifest_tmp, outdir / MANIFEST)
    os.replace(failures_tmp, outdir / FAILURES)
    return totals


def counts_of(totals: Totals) -> dict[str, Any]:
    return {
        "lines": totals.lines,
        "saved": totals.by_status[Status.SAVED],
        "skipped": totals.by_status[Status.SKIPPED],
        "failed": totals.by_status[Status.FAILED],
        "by_reason": dict(sorted(totals.by_reason.items())),
        "http_errors": {str(k): v for k, v in sorted(totals.http_errors.items())},
        "bytes": totals.bytes,
        "refetchable_failures": totals.refetchable,
    }


def write_summary(outdir: Path, summary: dict[str, Any]) -> None:
    tmp = outdir / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, outdir / SUMMARY)


class RunReport:
    """The parent's side of a run: records outcomes as they come, then writes the files."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.outdir = state.outdir
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self.this_run: Counter[str] = Counter()
        self.saved_now = 0
        self.recorded = 0
        self.duplicates: Duplicates | None = None
        #: told of each outcome the parent makes itself (the workers report theirs)
        self.on_own_outcome: Callable[[Outcome], None] | None = None
        self.tally = RunTally(state.failures_part)

    def record(self, outcome: Outcome, text: str | None = None) -> None:
        """Record an outcome that the parent made (an invalid line, a duplicate...)."""
        if self.on_own_outcome is not None:
            self.on_own_outcome(outcome)
        self._append(outcome, text)

    def _append(self, outcome: Outcome, text: str | None = None) -> None:
        self.state.append(outcome, text)
        self.tally.add(outcome)
        self._count(outcome.status, outcome.reason)

    def _append_record(self, record: Mapping[str, Any], text: str) -> None:
        """``_append`` for a worker's record as decoded JSON, with its text."""
        self.state.append_text(text)
        self.tally.add_record(record)
        self._count(record["status"], record["reason"])

    def _count(self, status: str, reason: str | None) -> None:
        self.recorded += 1
        self.this_run[str(reason or status)] += 1
        if status == Status.SAVED:
            self.saved_now += 1

    def merge(
        self,
        jobs: Iterable[Job],
        journaled: Mapping[tuple[str, int], tuple[dict[str, Any], str]],
        missing: Reason,
        error: str,
    ) -> None:
        """Record one outcome per job: the journaled record (decoded, with its text, as
        ``runner._journaled`` reads it), else ``missing``.

        The common path builds no Outcome (7 µs a line, issue 5): the worker's text goes
        to the segment as it is and the counts come from the decoded record. Only a 304
        (not_modified, whose record takes fields from the earlier one) and a line with
        no record are made into an Outcome.
        """
        finished: list[Mapping[str, Any]] = []
        validators = self.state.validators
        for job in jobs:
            found = journaled.get((job.input, job.line))
            if found is None:
                outcome = Outcome.not_saved(job, missing, error=error)
                self.record(outcome)
                finished.append(outcome.to_dict())
            elif found[0]["reason"] == Reason.NOT_MODIFIED and validators is not None:
                kept = validators.kept(Outcome.from_dict(found[0]))
                self._append(kept, kept.to_json())
                finished.append(kept.to_dict())
            else:
                self._append_record(*found)
                finished.append(found[0])
        if self.duplicates is not None:
            self.duplicates.finished(finished)
        self.state.flush()

    def finish(
        self,
        signal_exit: int | None,
        lines_read: int,
        carried: int,
        input_complete: bool,
        input_errors: list[str],
        unread: Iterable[str] = (),
        task: dict[str, Any] | None = None,
        shards: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Merge the records, write ``summary.json``; returns the summary. ``shards``:
        what a dataset format packed (packer.Packer.finish)."""
        if self.duplicates is not None:
            self.duplicates.close()
        self.state.close()
        totals = self.tally.publish(self.state, unread)
        if totals is None:  # earlier records, or a line recorded twice: merge them all
            totals = compact(self.state, unread=unread)
        elapsed = time.monotonic() - self.started
        failed = totals.by_status[Status.FAILED] > 0 or bool(input_errors)
        exit_code = (
            signal_exit if signal_exit is not None else (EXIT_FAILURES if failed else EXIT_OK)
        )
        summary: dict[str, Any] = {
            **counts_of(totals),
            "lines_read": lines_read,
            "input_complete": input_complete,
            "input_errors": input_errors,
            "this_run": {
                "lines": self.recorded,
                "resumed_lines": carried,
                "saved": self.saved_now,
                "by_outcome": dict(sorted(self.this_run.items())),
            },
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(self.saved_now / elapsed, 1) if elapsed > 0 else 0.0,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exit_code": exit_code,
            "manifest": MANIFEST,
            "failures": FAILURES,
        }
        if task is not None:
            summary["task"] = task
        if shards is not None:
            summary["shards"] = shards
        write_summary(self.outdir, summary)
        return summary


def _size(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def summary_text(summary: dict[str, Any], outdir: Path) -> str:
    """The few lines printed on stderr at the end of a run."""

    def reasons(status: Status) -> str:
        found = [f"{r} {n}" for r, n in summary["by_reason"].items() if Reason(r).status is status]
        return f" ({', '.join(found)})" if found else ""

    resumed = summary["this_run"]["resumed_lines"]
    lines = [
        f"imgdl: {summary['lines']} lines: {summary['saved']} saved, "
        f"{summary['skipped']} skipped{reasons(Status.SKIPPED)}, "
        f"{summary['failed']} failed{reasons(Status.FAILED)}",
        f"imgdl: this run: {summary['this_run']['saved']} saved in {summary['elapsed_s']:.1f} s, "
        f"{summary['images_per_s']} images/s"
        + (
            f"; {resumed} {'line' if resumed == 1 else 'lines'} already done by an earlier run"
            if resumed
            else ""
        ),
        f"imgdl: {_size(summary['bytes'])} saved in all; manifest {outdir / MANIFEST}; "
        f"failures {outdir / FAILURES} ({summary['refetchable_failures']} to retry); "
        f"exit {summary['exit_code']}",
    ]
    shards = summary.get("shards")
    if shards:
        lines.append(
            f"imgdl: {shards['format']} shards: {shards['written']} written this run; "
            f"{shards['shards']} in {outdir} holding {shards['samples']} samples"
        )
    for error in summary["input_errors"]:
        lines.append(f"imgdl: input error: {error}")
    if summary["input_errors"]:  # running the same again reads the same broken input
        lines.append(
            f"imgdl: the input broke off after {summary['lines_read']} lines: fix or replace "
            "it; a run over the whole list then resumes the lines recorded here"
        )
    elif not summary["input_complete"]:
        lines.append(
            f"imgdl: stopped after reading {summary['lines_read']} lines; run the same "
            "command again to finish (done lines are skipped, interrupted ones tried again)"
        )
    return "\n".join(lines)
