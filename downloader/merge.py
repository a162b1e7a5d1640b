"""``imgdl merge OUTDIR``: join the records of the tasks of a split job.

Each task of a job split by an orchestrator (see :mod:`downloader.tasks`) leaves
``OUTDIR/tasks/task-IIIII-of-NNNNN/{manifest.jsonl,failures.txt,summary.json}``.
Merging writes ``OUTDIR/manifest.jsonl``, ``OUTDIR/failures.txt`` and
``OUTDIR/summary.json`` for the whole job, streaming (one record in memory at a
time, one bit per line to notice a line recorded twice, as a run's own merge), and says which tasks
are missing or did not finish, so a job is never taken as complete when it is not.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from downloader import objstore
from downloader.errors import ImgdlError
from downloader.outcomes import Status
from downloader.report import EXIT_FAILURES, EXIT_OK, counts_of, write_records, write_summary
from downloader.settings import S3Settings
from downloader.state import (
    FAILURES,
    MANIFEST,
    REPORT_HTML,
    SUMMARY,
    TASKS_DIR,
    new_archive_folder,
    read_raw,
)
from downloader.tasks import task_name

_TASK_FOLDER = re.compile(r"task-(\d{5})-of-(\d{5})")


def _task_folders(outdir: Path) -> tuple[int, dict[int, Path]]:
    """The number of tasks of the job, and the folder of each task that left one."""
    found: dict[int, dict[int, Path]] = {}
    tasks_dir = outdir / TASKS_DIR
    if tasks_dir.is_dir():
        for entry in tasks_dir.iterdir():
            match = _TASK_FOLDER.fullmatch(entry.name)
            if match and entry.is_dir():
                index, count = int(match[1]), int(match[2])
                found.setdefault(count, {})[index] = entry
    if not found:
        raise ImgdlError(
            f"no task records in {tasks_dir}: 'imgdl merge' joins the records of a job "
            "split with --shard-index/--shard-count (or an orchestrator's index variable)"
        )
    if len(found) > 1:
        splits = ", ".join(f"{n} tasks" for n in sorted(found))
        raise ImgdlError(
            f"{tasks_dir} holds the tasks of different splits ({splits}): move the "
            "folders of the split you do not want elsewhere, then merge again"
        )
    ((count, folders),) = found.items()
    return count, folders


def _task_summary(folder: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def merge(outdir: Path) -> dict[str, Any]:
    """Write the job's manifest, failures and summary in ``outdir``; return the summary."""
    count, folders = _task_folders(outdir)
    unfinished: dict[str, str] = {}
    #: a dataset format: each task's shards stay in its folder (tasks/task-I-of-N/)
    shards: dict[str, Any] = {}

    def records() -> Iterator[tuple[dict[str, Any], str]]:
        for index in range(count):
            name = task_name(index, count)
            folder = folders.get(index)
            summary = _task_summary(folder) if folder is not None else None
            if folder is None or summary is None or not (folder / MANIFEST).exists():
                unfinished[name] = "missing: the task has not finished a run"
                continue
            if summary.get("exit_code") not in (EXIT_OK, EXIT_FAILURES):
                unfinished[name] = f"stopped (exit code {summary.get('exit_code')})"
            elif not summary.get("input_complete", True):
                unfinished[name] = "did not read its input to the end"
            _add_shards(shards, summary.get("shards"), f"{TASKS_DIR}/{name}")
            yield from read_raw(folder / MANIFEST)

    archived = _move_aside_other_records(outdir)
    totals = write_records(outdir, records())
    complete = not unfinished and not totals.repeated
    summary = {
        **counts_of(totals),
        "tasks": {"count": count, "merged": count - len(unfinished), "unfinished": unfinished},
        # two tasks of one split never share a line: these read different lists
        "lines_recorded_twice": totals.repeated,
        "input_complete": complete,
        "exit_code": EXIT_OK if complete and not totals.by_status[Status.FAILED] else EXIT_FAILURES,
        "merged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "manifest": MANIFEST,
        "failures": FAILURES,
    }
    if archived is not None:
        summary["archived"] = str(archived.relative_to(outdir))
    if shards:
        summary["shards"] = shards
    write_summary(outdir, summary)
    return summary


def _add_shards(total: dict[str, Any], task: Any, folder: str) -> None:
    """Count a task's shards (its summary's ``shards``) into the job's."""
    if not isinstance(task, dict):
        return
    total.setdefault("format", task.get("format"))
    total["shards"] = total.get("shards", 0) + int(task.get("shards", 0))
    total["samples"] = total.get("samples", 0) + int(task.get("samples", 0))
    total.setdefault("folders", []).append(folder)


def _move_aside_other_records(outdir: Path) -> Path | None:
    """Records in OUTDIR that are not an earlier merge's (a run of one task into the
    same folder) go to previous-runs/, as a run over other inputs does: never lost."""
    summary = _task_summary(outdir)
    if not (outdir / MANIFEST).exists() or (summary is not None and "tasks" in summary):
        return None
    target = new_archive_folder(outdir)
    for name in (MANIFEST, FAILURES, SUMMARY, REPORT_HTML):
        with contextlib.suppress(FileNotFoundError):
            (outdir / name).replace(target / name)
    return target


def merge_bucket(url: str, s3: S3Settings, workdir: Path) -> dict[str, Any]:
    """``imgdl merge s3://BUCKET/PREFIX``: the tasks' records are fetched from
    ``PREFIX/tasks/`` into ``workdir``, merged there, and the job's manifest, failures
    and summary uploaded to ``PREFIX``, each whole (see objstore.upload_records)."""
    location = objstore.parse(url)
    store = objstore.open_store(location.bucket, s3)
    tasks = location.below(TASKS_DIR)
    for name in objstore.folders_below(store, tasks):
        if _TASK_FOLDER.fullmatch(name):
            for record in (MANIFEST, SUMMARY):
                objstore.download(store, tasks.below(name), record, workdir / TASKS_DIR / name)
    summary = merge(workdir)
    objstore.upload_records(store, location, workdir, (MANIFEST, FAILURES, SUMMARY))
    return summary


def merge_text(summary: dict[str, Any], outdir: str) -> str:
    """The lines ``imgdl merge`` prints."""
    tasks = summary["tasks"]
    base = outdir.rstrip("/")
    lines = [
        f"imgdl: merged {tasks['merged']} of {tasks['count']} tasks: {summary['lines']} lines, "
        f"{summary['saved']} saved, {summary['skipped']} skipped, {summary['failed']} failed",
        f"imgdl: manifest {base}/{MANIFEST}; failures {base}/{FAILURES} "
        f"({summary['refetchable_failures']} to retry); exit {summary['exit_code']}",
    ]
    shards = summary.get("shards")
    if shards:
        lines.append(
            f"imgdl: {shards['shards']} {shards['format']} shards holding {shards['samples']} "
            f"samples, in each task's folder: {base}/{TASKS_DIR}/task-*/"
        )
    if summary.get("archived"):
        lines.append(
            f"imgdl: the records that were in {base} (not a merge's) were moved to "
            f"{base}/{summary['archived']}"
        )
    for name, why in tasks["unfinished"].items():
        lines.append(f"imgdl: {name} {why}; run it (again) with the same command, then merge")
    if summary["lines_recorded_twice"]:
        lines.append(
            f"imgdl: {summary['lines_recorded_twice']} lines were in two tasks' records "
            "(the tasks read different lists?); the first record of each was kept"
        )
    return "\n".join(lines)
