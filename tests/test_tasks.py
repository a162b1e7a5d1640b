"""A job split into tasks by an orchestrator's index variable: each line in exactly one
task, duplicates in the same task, and ``imgdl merge`` joining the records."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from downloader.devserver import DevServer
from downloader.settings import LimitsSettings, load
from downloader.tasks import TaskSlice, resolve
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, write_list

TASKS = 4


def _urls(server: DevServer) -> list[str]:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(160)]
    urls += [f"{server.url}/i/{n}.jpg" for n in range(0, 160, 8)]  # 20 duplicates
    urls += [f"{server.url}/status/404/{n}" for n in range(6)]
    return [*urls, "not a url", "ftp://example.org/x.jpg"]


def _task_env(index: int) -> dict[str, str]:
    return clean_env(JOB_COMPLETION_INDEX=str(index), IMGDL_RUN_SHARD_COUNT=str(TASKS))


def _records(folder: Path) -> list[dict[str, Any]]:
    return read_manifest(folder)


def test_four_tasks_cover_every_line_once_and_merge(tmp_path: Path, server: DevServer) -> None:
    urls = write_list(tmp_path / "urls.txt", _urls(server))
    outdir = tmp_path / "out"
    args = [sys.executable, "-m", "downloader", "fetch", str(urls), "-o", str(outdir)]
    args += ["--processes", "1", "--no-progress"]
    tasks = [
        subprocess.Popen(args, env=_task_env(i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i in range(TASKS)
    ]
    for proc in tasks:  # all four at once, as an orchestrator starts them
        _, stderr = proc.communicate(timeout=120)
        # 1 where the task's slice (which depends on the server's port) holds a 404
        assert proc.returncode in (0, 1), stderr.decode()[-2000:]
    folders = [outdir / "tasks" / f"task-{i:05d}-of-{TASKS:05d}" for i in range(TASKS)]
    per_task = [_records(folder) for folder in folders]
    lines = [{r["line"] for r in records} for records in per_task]
    assert all(lines), [len(s) for s in lines]  # every task got some work
    for i in range(TASKS):
        for j in range(i + 1, TASKS):
            assert not lines[i] & lines[j], (i, j)
    total = len(_urls(server))
    assert set().union(*lines) == set(range(1, total + 1))
    for i, records in enumerate(per_task):
        summary = read_summary(folders[i])
        assert summary["task"] == {"index": i, "count": TASKS, "source": "JOB_COMPLETION_INDEX"}
        assert summary["lines"] == len(records)
        for record in records:  # a duplicate points at a line of its own task
            if record["duplicate_of"]:
                assert int(record["duplicate_of"].rsplit(":", 1)[1]) in lines[i]
    assert sum(Counter(r["reason"] for r in records)["duplicate"] for records in per_task) == 20

    merged = run_cli("merge", str(outdir))
    assert merged.returncode == 1, merged.stderr  # the 404s and bad lines failed
    assert f"merged {TASKS} of {TASKS} tasks: {total} lines" in merged.stderr
    summary = read_summary(outdir)
    manifest = read_manifest(outdir)
    assert sorted(r["line"] for r in manifest) == list(range(1, total + 1))
    assert summary["tasks"] == {"count": TASKS, "merged": TASKS, "unfinished": {}}
    assert summary["input_complete"] is True

    # the same list in one unsplit run: the same counts
    single = tmp_path / "single"
    assert run_cli("fetch", str(urls), "-o", str(single)).returncode == 1
    alone = read_summary(single)
    for key in ("lines", "saved", "skipped", "failed", "by_reason", "bytes", "http_errors"):
        assert summary[key] == alone[key], key
    failures = (outdir / "failures.txt").read_text().split()
    assert sorted(failures) == sorted((single / "failures.txt").read_text().split())
    # the images of all tasks are in OUTDIR itself, one per distinct URL saved
    saved_paths = {r["path"] for r in manifest if r["status"] == "saved"}
    assert len(saved_paths) == 160 and all((outdir / p).is_file() for p in saved_paths)


def test_a_task_run_again_fetches_nothing_twice(tmp_path: Path, server: DevServer) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(60)])
    outdir = tmp_path / "out"
    flags = ["--shard-index", "1", "--shard-count", "3", "-o", str(outdir)]
    first = run_cli("fetch", str(urls), *flags)
    assert first.returncode == 0, first.stderr
    hits = len(server.requests)
    assert 0 < hits < 60
    again = run_cli("fetch", str(urls), *flags)
    assert again.returncode == 0, again.stderr
    assert len(server.requests) == hits
    records = read_manifest(outdir / "tasks" / "task-00001-of-00003")
    assert len(records) == hits and {r["status"] for r in records} == {"saved"}


def test_merge_names_a_missing_task(tmp_path: Path, server: DevServer) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(30)])
    outdir = tmp_path / "out"
    for index in (0, 2):  # task 1 never ran
        env = clean_env(CLOUD_RUN_TASK_INDEX=str(index), CLOUD_RUN_TASK_COUNT="3")
        assert run_cli("fetch", str(urls), "-o", str(outdir), env=env).returncode == 0
    merged = run_cli("merge", str(outdir))
    assert merged.returncode == 1
    assert "task-00001-of-00003 missing" in merged.stderr
    summary = read_summary(outdir)
    assert summary["input_complete"] is False
    assert list(summary["tasks"]["unfinished"]) == ["task-00001-of-00003"]
    assert summary["lines"] == len(read_manifest(outdir)) < 30


def test_merge_moves_aside_the_records_of_a_run_of_one(tmp_path: Path, server: DevServer) -> None:
    """A folder that held a plain run's records, then the tasks of a split job: the
    merge must not overwrite the plain run's records (found by a new user's trial)."""
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(12)])
    outdir = tmp_path / "out"
    assert run_cli("fetch", str(urls), "-o", str(outdir)).returncode == 0
    plain = (outdir / "manifest.jsonl").read_bytes()
    for index in range(2):
        flags = ["--shard-index", str(index), "--shard-count", "2"]
        assert run_cli("fetch", str(urls), "-o", str(outdir), *flags).returncode == 0
    merged = run_cli("merge", str(outdir))
    assert merged.returncode == 0, merged.stderr
    (archive,) = (outdir / "previous-runs").iterdir()
    assert (archive / "manifest.jsonl").read_bytes() == plain
    assert f"were moved to {outdir}/previous-runs/" in merged.stderr
    assert read_summary(outdir)["archived"] == f"previous-runs/{archive.name}"
    assert len(read_manifest(outdir)) == 12
    again = run_cli("merge", str(outdir))  # a merge's own records are simply replaced
    assert again.returncode == 0 and len(list((outdir / "previous-runs").iterdir())) == 1


def test_config_show_says_which_task_this_is() -> None:
    shown = run_cli(
        "config", "show", env=clean_env(CLOUD_RUN_TASK_INDEX="2", CLOUD_RUN_TASK_COUNT="5")
    )
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line for line in shown.stdout.splitlines()}
    assert "# default: 2 (from CLOUD_RUN_TASK_INDEX)" in rows["run.shard_index"]
    assert "# default: 5" in rows["run.shard_count"]
    refused = run_cli("config", "show", env=clean_env(JOB_COMPLETION_INDEX="2"))
    assert refused.returncode == 2 and "IMGDL_RUN_SHARD_COUNT" in refused.stderr


def test_merge_without_tasks_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("merge", str(tmp_path))
    assert result.returncode == 2
    assert "no task records in" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"JOB_COMPLETION_INDEX": "3"}, [], "IMGDL_RUN_SHARD_COUNT"),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, [], "set AWS_BATCH_JOB_ARRAY_SIZE"),
        ({}, ["--shard-index", "4", "--shard-count", "4"], "not below 4"),
        ({"IMGDL_RUN_SHARD_COUNT": "4", "JOB_COMPLETION_INDEX": "4"}, [], "outside 0..3"),
        ({}, ["--shard-count", "4"], "--shard-index"),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "x", "AWS_BATCH_JOB_ARRAY_SIZE": "2"}, [], "not a whole"),
    ],
)
def test_an_incomplete_split_is_refused(
    tmp_path: Path, env: dict[str, str], flags: list[str], message: str
) -> None:
    urls = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/x.jpg"])
    result = run_cli("fetch", str(urls), *flags, "-o", str(tmp_path / "o"), env=clean_env(**env))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"JOB_COMPLETION_INDEX": "2", "IMGDL_RUN_SHARD_COUNT": "5"}, (2, 5)),
        ({"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "3"}, (1, 3)),
        ({"CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "2"}, (0, 2)),
        ({"CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "1"}, None),  # one task
        ({}, None),
    ],
)
def test_the_orchestrators_variables(env: dict[str, str], expected: tuple[int, int] | None) -> None:
    settings = load(env=env).settings
    task = resolve(settings, env)
    assert (None if task is None else (task.index, task.count)) == expected


def test_each_url_goes_to_one_task_and_limits_are_shared() -> None:
    slices = [TaskSlice(i, 4) for i in range(4)]
    urls = [f"http://h{n % 7}.example/{n}.jpg" for n in range(2000)]
    owners = [sum(s.takes(url) for s in slices) for url in urls]
    assert set(owners) == {1}
    spread = Counter(next(i for i, s in enumerate(slices) if s.takes(u)) for u in urls)
    assert min(spread.values()) > 400  # about 500 each
    limits = LimitsSettings.model_validate(
        {
            "rate": 100,
            "per_host_rate": 8,
            "per_host_connections": 6,
            "hosts": {"a.example": {"rate": 2, "connections": 2}},
        }
    )
    share = slices[0].limits(limits)
    assert (share.rate, share.per_host_rate, share.per_host_connections) == (25, 2, 1)
    assert (share.hosts["a.example"].rate, share.hosts["a.example"].connections) == (0.5, 1)
    assert json.loads(share.model_dump_json())  # still a valid settings value
