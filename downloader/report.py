"""The run's written record: manifest, failures file, summary, exit status.

Only the parent writes these files. Workers journal their outcomes per shard;
the parent merges a journal into ``manifest.jsonl`` when its shard is over, so
the manifest holds exactly one record per input line and nothing half-written.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from downloader.outcomes import REFETCHABLE, Job, Outcome, Reason, Status

MANIFEST = "manifest.jsonl"
FAILURES = "failures.txt"
SUMMARY = "summary.json"

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def read_journal(path: Path) -> dict[tuple[str, int], Outcome]:
    """Outcomes a worker journaled; a torn last line (the worker was killed) is ignored."""
    found: dict[tuple[str, int], Outcome] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    outcome = Outcome.from_json(line)
                except (ValueError, TypeError, KeyError):
                    continue
                found.setdefault((outcome.input, outcome.line), outcome)
    except FileNotFoundError:
        pass
    return found


class RunReport:
    """Collects every outcome of a run into the manifest, failures file and counters."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC)
        self._manifest: IO[str] = open(outdir / MANIFEST, "w", encoding="utf-8")  # noqa: SIM115
        self._failures: IO[str] = open(outdir / FAILURES, "w", encoding="utf-8")  # noqa: SIM115
        self.by_status: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.http_errors: Counter[int] = Counter()
        self.bytes = 0
        self.refetchable = 0

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def record(self, outcome: Outcome) -> None:
        self._manifest.write(outcome.to_json() + "\n")
        self.by_status[outcome.status] += 1
        if outcome.reason is not None:
            self.by_reason[outcome.reason] += 1
        if outcome.reason is Reason.HTTP_ERROR and outcome.http_status is not None:
            self.http_errors[outcome.http_status] += 1
        if outcome.status is Status.SAVED:
            self.bytes += outcome.bytes
        if outcome.reason in REFETCHABLE:
            self._failures.write(outcome.url + "\n")
            self.refetchable += 1

    def merge(
        self,
        jobs: Iterable[Job],
        journaled: dict[tuple[str, int], Outcome],
        missing: Reason,
        error: str,
    ) -> None:
        """Record one outcome per job: the journaled one, else ``missing``."""
        for job in jobs:
            outcome = journaled.get((job.input, job.line))
            if outcome is None:
                outcome = Outcome.not_saved(job, missing, error=error)
            self.record(outcome)
        self._manifest.flush()
        self._failures.flush()

    def exit_code(self, signal_exit: int | None) -> int:
        if signal_exit is not None:
            return signal_exit
        return EXIT_FAILURES if self.by_status[Status.FAILED] else EXIT_OK

    def finish(self, exit_code: int, lines_read: int, input_complete: bool) -> dict[str, Any]:
        """Close the files and write ``summary.json``; returns the summary."""
        self._manifest.close()
        self._failures.close()
        elapsed = time.monotonic() - self.started
        saved = self.by_status[Status.SAVED]
        summary: dict[str, Any] = {
            "lines": self.total,
            "lines_read": lines_read,
            "input_complete": input_complete,
            "saved": saved,
            "skipped": self.by_status[Status.SKIPPED],
            "failed": self.by_status[Status.FAILED],
            "by_reason": dict(sorted(self.by_reason.items())),
            "http_errors": {str(k): v for k, v in sorted(self.http_errors.items())},
            "bytes": self.bytes,
            "elapsed_s": round(elapsed, 3),
            "images_per_s": round(saved / elapsed, 1) if elapsed > 0 else 0.0,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exit_code": exit_code,
            "manifest": MANIFEST,
            "failures": FAILURES,
            "refetchable_failures": self.refetchable,
        }
        tmp = self.outdir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.outdir / SUMMARY)
        return summary


def summary_text(summary: dict[str, Any], outdir: Path) -> str:
    """The few lines printed on stderr at the end of a run."""
    reasons = ", ".join(f"{r} {n}" for r, n in summary["by_reason"].items())
    mb = summary["bytes"] / 1e6
    lines = [
        f"imgdl: {summary['lines']} lines: {summary['saved']} saved, "
        f"{summary['skipped']} skipped, {summary['failed']} failed"
        + (f" ({reasons})" if reasons else ""),
        f"imgdl: {mb:.1f} MB in {summary['elapsed_s']:.1f} s, {summary['images_per_s']} images/s",
        f"imgdl: manifest {outdir / MANIFEST}, failures {outdir / FAILURES} "
        f"({summary['refetchable_failures']} URLs), exit {summary['exit_code']}",
    ]
    if not summary["input_complete"]:
        lines.append(
            f"imgdl: stopped before the end of the input ({summary['lines_read']} lines read); "
            "run the same command again to finish"
        )
    return "\n".join(lines)
