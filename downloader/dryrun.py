"""``imgdl fetch --dry-run``: read the inputs and settings as a run would, fetch nothing.

A real run opens the output folder (lock, journals, a SQLite file of the URLs
seen) before it reads a line. A dry run must neither write there nor connect
anywhere, so it has no runner: it reads the lines with the same sources code
(the same URL checks), decides duplicates and name collisions with the same
:meth:`Duplicates.for_run` (its SQLite file in a temporary folder, so memory
stays bounded on any list), checks names as a worker would, and for one task of
a split job keeps the lines that task takes (``tasks.TaskSlice``). What it cannot
know without the network or the output folder, it does not guess: lines done
by an earlier run into the same folder and files already on disk are counted
as to be fetched.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from downloader.dedupe import Duplicates
from downloader.errors import UnsafeNameError
from downloader.objstore import is_s3
from downloader.outcomes import Job, Outcome, Reason
from downloader.report import EXIT_FAILURES, EXIT_OK
from downloader.settings import Settings
from downloader.sources import InputList, read_all
from downloader.storage import stem_for
from downloader.tasks import TaskSlice
from downloader.transform import require_pillow as require_pillow_for_images
from downloader.validate import require_pillow

#: Problems listed one by one; the rest are only counted.
SHOWN_PROBLEMS = 10
#: Distinct hosts counted; past this many the count says "more than".
MAX_HOSTS = 10_000
_MAX_URL_SHOWN = 120


@dataclasses.dataclass
class DryRun:
    """What a run with these inputs and settings would do, as far as it is known
    before any request."""

    inputs: list[tuple[str, str]]  # (label, format)
    outdir: str  # a folder, or an s3:// prefix
    task: TaskSlice | None = None
    others: int = 0  # lines left to the other tasks of a split job
    lines: int = 0
    to_fetch: int = 0
    duplicates: int = 0
    failing: Counter[str] = dataclasses.field(default_factory=Counter)  # by reason
    problems: list[str] = dataclasses.field(default_factory=list)  # the first few, with file:line
    hosts: Counter[str] = dataclasses.field(default_factory=Counter)
    more_hosts: bool = False
    input_errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: every line is fine; 1: some lines would fail before any request (or an
        input broke off), as a real run would then exit 1."""
        return EXIT_FAILURES if self.failing or self.input_errors else EXIT_OK

    def record(self, outcome: Outcome) -> None:
        """A line that would fail before any request: counted, and the first few kept."""
        reason = outcome.reason or Reason.INTERNAL_ERROR
        self.failing[reason] += 1
        if len(self.problems) < SHOWN_PROBLEMS:
            url = outcome.url if len(outcome.url) <= _MAX_URL_SHOWN else outcome.url[:117] + "..."
            shown = f" ({url})" if url else ""
            self.problems.append(
                f"{outcome.input}:{outcome.line}: {reason}: {outcome.error}{shown}"
            )

    def fetch(self, job: Job) -> None:
        self.to_fetch += 1
        host = urlsplit(job.url).hostname or ""
        if host in self.hosts or len(self.hosts) < MAX_HOSTS:
            self.hosts[host] += 1
        else:
            self.more_hosts = True

    def _task_row(self) -> list[tuple[str, str]]:
        if self.task is None:
            return []
        left = f"{self.others:,} lines left to the other tasks"
        return [("task", f"{self.task.name} (from {self.task.source}); {left}")]

    def text(self) -> str:
        """The report, one fact a line, for a person (and for grep)."""
        inputs = ", ".join(f"{label} ({fmt})" for label, fmt in self.inputs)
        hosts = f"more than {MAX_HOSTS:,}" if self.more_hosts else f"{len(self.hosts):,}"
        busiest = ", ".join(f"{host} {n:,}" for host, n in self.hosts.most_common(3))
        if is_s3(self.outdir):
            folder = "an object store; objects already there count as to fetch"
        elif Path(self.outdir).exists():
            folder = "exists; lines done by an earlier run and files on disk count as to fetch"
        else:
            folder = "does not exist yet"
        rows = [
            ("dry run", "no request made, nothing written"),
            ("inputs", inputs),
            *self._task_row(),
            ("lines", f"{self.lines:,}"),
            ("to fetch", f"{self.to_fetch:,}"),
            ("duplicates", f"{self.duplicates:,} (fetched once, for their first line)"),
            ("invalid lines", f"{self.failing[Reason.INVALID_URL]:,}"),
            ("invalid names", f"{self.failing[Reason.INVALID_NAME]:,}"),
            ("name collisions", f"{self.failing[Reason.NAME_COLLISION]:,}"),
            ("blocked addresses", f"{self.failing[Reason.BLOCKED_ADDRESS]:,} (literal IPs)"),
            ("hosts", f"{hosts}" + (f" (most URLs: {busiest})" if busiest else "")),
            ("output folder", f"{self.outdir} ({folder})"),
        ]
        width = max(len(name) for name, _ in rows) + 1
        out = [f"{name + ':':<{width}} {value}" for name, value in rows]
        out += [f"input error: {error}" for error in self.input_errors]
        if self.problems:
            more = sum(self.failing.values()) - len(self.problems)
            out.append("first problems:" if more else "problems:")
            out += [f"  {problem}" for problem in self.problems]
            if more:
                out.append(f"  ... and {more:,} more")
            out.append("fix the lines above (or drop them); the run records them as failed")
        return "\n".join(out)


def dry_run(settings: Settings, inputs: list[InputList], task: TaskSlice | None = None) -> DryRun:
    """Read every line of ``inputs`` and decide what a run would do with it, offline.
    With ``task`` (a split job), only the lines that task takes, as its run would."""
    require_pillow(settings.validate_)  # a run with decode on and no Pillow stops here too
    require_pillow_for_images(settings)
    # imported here: the network policy pulls in aiohttp, which a parent does not need
    from downloader.netpolicy import BlockedAddressError, NetworkPolicy

    policy = NetworkPolicy.from_strings(settings.network.allow)
    outdir = settings.output.dir
    report = DryRun(inputs=[(i.label, i.format) for i in inputs], outdir=outdir, task=task)
    template = settings.output.name_template
    with tempfile.TemporaryDirectory(prefix="imgdl-dry-run-") as tmp:
        duplicates = Duplicates.for_run(
            Path(tmp) / "dedupe.sqlite",
            report.record,
            settings,
            case_blind=lambda: not is_s3(outdir) and _case_blind(Path(outdir)),
        )
        try:
            for item in read_all(inputs):
                if task is not None and not task.takes(item.url):
                    report.others += 1
                    continue
                report.lines += 1
                if isinstance(item, Outcome):
                    report.record(item)
                elif duplicates.admit(item):
                    try:  # a literal address the policy refuses fails before any request
                        policy.check_host(urlsplit(item.url).hostname or "")
                    except BlockedAddressError as exc:
                        report.record(
                            Outcome.not_saved(item, Reason.BLOCKED_ADDRESS, error=str(exc))
                        )
                        continue
                    _name(report, item, template)
        finally:
            duplicates.discard()
    report.duplicates = duplicates.found
    report.input_errors = [i.error for i in inputs if i.error]
    return report


def _name(report: DryRun, job: Job, template: str) -> None:
    """A worker names the file before it sends a request: a name that would leave
    the output folder is ``invalid_name`` there, so it is here."""
    try:
        stem_for(job, template)
    except UnsafeNameError as exc:
        report.record(Outcome.not_saved(job, Reason.INVALID_NAME, error=str(exc)))
        return
    report.fetch(job)


def _case_blind(folder: Path) -> bool:
    """Does the file system of ``folder`` ignore case? ``storage.case_insensitive``
    writes a probe file, which a dry run must not: this looks up the nearest
    existing folder on the way (OUTDIR may not exist yet) under its name with the
    case swapped. False when no name on the way has letters."""
    for path in (folder.resolve(), *folder.resolve().parents):
        swapped = path.with_name(path.name.swapcase())
        if path.name == swapped.name or not path.exists():
            continue
        return swapped.exists() and os.path.samefile(path, swapped)
    return False
