"""The real process pool under stress: a worker killed mid-shard, and signals to the parent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from downloader.devserver import DevServer
from downloader.proctree import running, workers
from tests.conftest import (
    clean_env,
    image_files,
    read_manifest,
    read_summary,
    start_cli,
    wait_for,
    write_list,
)


def _block_requests(server: DevServer) -> int:
    return sum(1 for _, _, path in server.requests if path.startswith("/block/"))


def _start(listing: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start_cli("fetch", str(listing), "-o", str(out), "--processes", "2", *extra)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(150)]
    urls += [f"{server.url}/block/{n}" for n in range(10)]
    urls += [f"{server.url}/i/{n}.jpg" for n in range(150, 300)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = _start(listing, out, "--shard-size", "40", "--concurrency", "8")
    try:
        wait_for(lambda: server.blocked >= 8)
        pool = workers(proc.pid)
        assert len(pool) == 2, pool
        for pid in pool:  # kill the whole pool: the shards in flight lose their worker
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        server.release()
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()
    records = read_manifest(out)
    assert len(records) == 310
    assert sorted(r["line"] for r in records) == list(range(1, 311))
    assert {r["status"] for r in records} <= {"saved", "skipped"}
    assert read_summary(out)["saved"] + read_summary(out)["skipped"] == 310
    assert len(image_files(out)) == 310
    assert not list(out.rglob("*.part"))
    assert b"retrying shard" in stderr


@pytest.mark.slow
def test_shard_whose_worker_dies_twice_is_worker_crashed(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/block/{n}" for n in range(12)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = _start(listing, out, "--shard-size", "6", "--concurrency", "6")
    try:
        for round_ in (1, 2):
            wait_for(lambda n=round_: _block_requests(server) >= 12 * n)
            for pid in workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        server.release()
        proc.kill()
    assert proc.returncode == 1, stderr.decode()
    records = read_manifest(out)
    assert len(records) == 12
    assert {(r["status"], r["reason"]) for r in records} == {("failed", "worker_crashed")}
    assert (out / "failures.txt").read_text().split() == urls or sorted(
        (out / "failures.txt").read_text().split()
    ) == sorted(urls)
    assert image_files(out) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]
)
def test_signal_stops_run_and_accounts_every_line(
    server: DevServer, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(20)]
    urls += [f"{server.url}/block/{n}" for n in range(4)]
    urls += [f"{server.url}/i/{n}.jpg" for n in range(20, 400)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = _start(listing, out, "--shard-size", "24", "--concurrency", "4")
    try:
        wait_for(lambda: server.blocked >= 4)
        proc.send_signal(sig)
        time.sleep(0.5)
        server.release()  # the downloads in flight finish inside the grace period
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr.decode()
    assert b"Traceback" not in stderr
    records = read_manifest(out)
    summary = read_summary(out)
    assert summary["exit_code"] == code
    assert len(records) == summary["lines"] == summary["lines_read"]
    assert len({r["line"] for r in records}) == len(records)
    reasons = {r["reason"] for r in records}
    assert "interrupted" in reasons
    assert reasons <= {None, "interrupted"}
    # the blocked downloads were in flight and finished in the grace period
    blocked = [r for r in records if "/block/" in r["url"]]
    assert {r["status"] for r in blocked} == {"saved"}
    assert not list(out.rglob("*.part"))


def test_sighup_ignored_at_start_stays_ignored(server: DevServer, tmp_path: Path) -> None:
    """Under nohup (SIGHUP ignored when imgdl starts) a closed terminal must not stop it."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/slow/100/{n}" for n in range(40)])
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "downloader", "fetch", str(listing), "-o", str(out)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # as nohup does
    )
    try:
        wait_for(lambda: len(server.requests) >= 4)
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert read_summary(out)["saved"] == 40


def test_a_download_cut_by_the_grace_period_counts_its_try(
    server: DevServer, tmp_path: Path
) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/hang/{n}" for n in range(2)])
    out = tmp_path / "out"
    proc = start_cli(
        "fetch", str(listing), "-o", str(out), env=clean_env(IMGDL_RUN_GRACE_PERIOD="0.5")
    )
    try:
        wait_for(lambda: len(server.requests) >= 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr.decode()[-2000:]
    records = read_manifest(out)
    assert {(r["reason"], r["error"], r["attempts"]) for r in records} == {
        ("interrupted", "grace period over", 1)
    }


def test_second_sigint_aborts_at_once(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(10)]
    urls += [f"{server.url}/block/{n}" for n in range(6)]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = _start(listing, out, "--shard-size", "8", "--concurrency", "8")
    try:
        wait_for(lambda: server.blocked >= 6)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the grace period (20 s) is running: blocked downloads wait
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - started
    finally:
        server.release()
        proc.kill()
    assert proc.returncode == 130, stderr.decode()
    assert took < 10  # not the 20 s grace period
    records = read_manifest(out)
    assert len(records) == 16
    blocked = [r for r in records if "/block/" in r["url"]]
    assert {(r["status"], r["reason"]) for r in blocked} == {("failed", "interrupted")}
    assert not list(out.rglob("*.part"))
    assert len(image_files(out)) == sum(r["status"] == "saved" for r in records)


def test_parent_does_not_import_the_http_stack() -> None:
    """Only workers download: the parent starts faster without aiohttp (about 0.2 s), and
    a check of the settings (tls.ca_bundle among them) must not pull it in."""
    probe = (
        "import sys\n"
        "from downloader import settings\n"
        "from downloader.cli import cli\n"
        "import downloader.runner\n"
        "settings.load(config_file=None, overrides={})\n"
        "heavy = ('aiohttp', 'downloader.fetch', 'downloader.transport')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_retried_shard_does_not_glue_its_first_record_to_a_torn_line(tmp_path: Path) -> None:
    """The attempt before was killed mid-write: its journal ends without a newline. The
    retry appends to the same journal; its first record must not be lost with the torn
    line (review of issue 5)."""
    from downloader.outcomes import Job, Outcome, Reason
    from downloader.shardrun import Journal
    from downloader.state import read_lines

    journal = tmp_path / "shard.jsonl"
    first = Outcome.not_saved(Job(url="http://x/1", input="a", line=1), Reason.TIMEOUT)
    journal.write_text(first.to_json() + "\n" + first.to_json()[:30])
    second = Outcome.not_saved(Job(url="http://x/2", input="a", line=2), Reason.TIMEOUT)
    writer = Journal(journal)
    writer.write(second)
    writer.close()
    assert [o.line for o, _ in read_lines(journal)] == [1, 2]


def test_a_journal_record_is_in_the_file_as_soon_as_it_is_written(tmp_path: Path) -> None:
    """What a worker killed with -9 had not yet written is lost (its images recorded as
    skipped_exists by the next run): records held back for one write per turn of the
    event loop lost 107-207 records in runs with 6-8 kills (review of issue 5)."""
    import asyncio

    from downloader.outcomes import Job, Outcome, Reason
    from downloader.shardrun import Journal
    from downloader.state import read_lines

    journal = tmp_path / "j.jsonl"

    async def one_busy_turn() -> list[int]:
        writer = Journal(journal)
        in_file = []
        for line in range(1, 65):
            writer.write(
                Outcome.not_saved(Job(url=f"http://x/{line}", input="a", line=line), Reason.TIMEOUT)
            )
            in_file.append(len(list(read_lines(journal))))
        writer.close()
        return in_file

    assert asyncio.run(one_busy_turn()) == list(range(1, 65))


def test_a_journal_that_cannot_be_written_still_ends_the_shard_span_and_flushes(
    tmp_path: Path, server: DevServer
) -> None:
    """A full disk fails the shard (JournalError), and the shard still pushes its
    progress, ends its span and flushes its telemetry (invariant 6)."""
    import asyncio
    import multiprocessing

    import downloader.shardrun as shardrun
    from downloader.limits import SharedLimits
    from downloader.outcomes import Job
    from downloader.settings import load
    from downloader.sharding import Shard
    from downloader.worker import WorkerContext

    calls: list[str] = []
    env = {"IMGDL_NETWORK_ALLOW": "[127.0.0.0/8]", "IMGDL_HTTP__CONCURRENCY": "4"}

    async def main() -> None:
        fork = multiprocessing.get_context("fork")
        (tmp_path / "parts").mkdir()
        context = WorkerContext(
            settings=load(env=env).settings,
            outdir=tmp_path,
            stop=fork.Event(),
            limits=SharedLimits.create(fork),
            parts_dir=tmp_path / "parts",
        )
        jobs = tuple(Job(url=f"{server.url}/i/{n}.jpg", input="a", line=n) for n in range(1, 4))
        run = shardrun.ShardRun(context, Shard(shard_id=1, jobs=jobs, journal=Path("/dev/full")))
        run.feed.push = lambda *a, **k: calls.append("feed.push")  # type: ignore[method-assign]
        run.telemetry.end_shard = lambda *a, **k: calls.append("end_shard")  # type: ignore[method-assign]
        run.telemetry.flush = lambda *a, **k: calls.append("flush")  # type: ignore[method-assign]
        try:
            with pytest.raises(shardrun.JournalError, match="No space left"):
                await run.run()
        finally:
            await shardrun.close_process_session()
            shardrun._client = None

    asyncio.run(main())
    assert calls == ["feed.push", "end_shard", "flush"]


def test_workers_come_from_a_fork_server_reaped_before_the_parent_exits(
    server: DevServer, tmp_path: Path
) -> None:
    """The workers are forked from one server (their imports done once, while the parent
    sets up); the parent waits for it before it exits, so the CPU of the server and of
    its workers counts in the parent's RUSAGE_CHILDREN (what time and the bench read)."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/slow/100/{n}" for n in range(60)])
    proc = _start(listing, tmp_path / "out", "--shard-size", "20", "--concurrency", "4")
    try:
        wait_for(lambda: len(workers(proc.pid)) == 2)
        forked_from = {_parent_of(pid) for pid in workers(proc.pid)}
        assert len(forked_from) == 1 and proc.pid not in forked_from, forked_from
        (fork_server,) = forked_from
        assert _parent_of(fork_server) == proc.pid
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert not running(fork_server)  # gone already: reaped by the parent, not left behind
    assert read_summary(tmp_path / "out")["saved"] == 60


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _blocked_signals(pid: int) -> set[int]:
    """The signals blocked in process ``pid`` (SigBlk of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


def test_the_fork_server_keeps_the_stop_signals_blocked(server: DevServer, tmp_path: Path) -> None:
    """Every worker is a fork of the server and inherits its signal mask: SIGINT,
    SIGTERM and SIGHUP must be blocked there, so that a Ctrl-C to the process group
    cannot hit a worker before init_worker ignores them (nor the server mid-import).
    Starting the resource tracker unblocked SIGINT and SIGTERM in the parent just
    before the server was spawned, leaving it only SIGHUP."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/slow/100/{n}" for n in range(40)])
    proc = _start(listing, tmp_path / "out", "--concurrency", "4")
    try:
        wait_for(lambda: len(workers(proc.pid)) >= 1)
        (fork_server,) = {_parent_of(pid) for pid in workers(proc.pid)}
        blocked = _blocked_signals(fork_server)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert {signal.SIGINT, signal.SIGTERM, signal.SIGHUP} <= blocked, sorted(blocked)


def test_a_run_with_no_usable_temporary_folder_still_runs(
    server: DevServer, tmp_path: Path
) -> None:
    """The fork server listens on a socket in the temporary folder. Where there is none
    to write in (TMPDIR missing, /tmp, /var/tmp and the working directory read-only, as
    in a container with a read-only root file system), the workers are spawned as
    before instead of the run ending in a traceback at start-up. In a mount namespace
    of its own (``unshare -m``); the output folder is a tmpfs mounted there."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.decode().strip()}")
    urls = [f"{server.url}/i/{n}.jpg" for n in range(20)]
    listing = write_list(tmp_path / "u.txt", urls)
    out, stuck = tmp_path / "out", tmp_path / "cwd"
    out.mkdir()
    stuck.mkdir()
    script = (
        "set -e\n"
        "for d in /tmp /var/tmp; do\n"
        "  if [ -d $d ]; then mount --bind $d $d; mount -o remount,ro,bind $d; fi\n"
        "done\n"
        f"mount --bind {stuck} {stuck}; mount -o remount,ro,bind {stuck}\n"
        f"mount -t tmpfs tmpfs {out}\n"  # after /tmp went read-only: the one place to write
        f"cd {stuck}\n"
        f"{sys.executable} -m downloader fetch {listing} -o {out / 'o'} --processes 2 || true\n"
        f"cat {out / 'o' / 'manifest.jsonl'}\n"
    )
    env = {k: v for k, v in clean_env().items() if k not in ("TEMP", "TMP")}
    env.update(TMPDIR="/nonexistent-tmpdir", PYTHONPATH=str(Path(__file__).parent.parent))
    done = subprocess.run(
        ["unshare", "-m", "bash", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["url"] for r in records) == sorted(urls)
    assert all(r["status"] == "saved" for r in records), records
