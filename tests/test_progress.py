"""Live progress: a bar under a real pseudo-terminal, log lines when piped, fed by the
workers' shared counters and the parent's own outcomes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from downloader.devserver import DevServer
from downloader.progress import count_lines
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, write_list

GOOD = 300
BAD = 3


def _list(tmp_path: Path, server: DevServer) -> Path:
    urls = [f"{server.url}/slow/20/{n}" for n in range(GOOD)]
    urls += [f"{server.url}/status/404/{n}" for n in range(BAD)]
    return write_list(tmp_path / "urls.txt", urls)


def _run_in_pty(args: list[str], rows: int, cols: int, timeout: float = 60) -> tuple[int, str]:
    """Run ``imgdl ARGS`` with stdout and stderr on a new pseudo-terminal of that size."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "downloader", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=clean_env(),
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed its end
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, output.decode(errors="replace")


@pytest.mark.parametrize(
    ("rows", "cols"), [(40, 120), (0, 0), (0, 110)], ids=["sized", "unsized", "no-rows"]
)
def test_a_terminal_gets_a_progress_bar(
    tmp_path: Path, server: DevServer, rows: int, cols: int
) -> None:
    urls = _list(tmp_path, server)
    outdir = tmp_path / "out"
    args = ["fetch", str(urls), "-o", str(outdir), "--processes", "2", "--concurrency", "8"]
    code, output = _run_in_pty([*args, "--shard-size", "100"], rows, cols)
    assert code == 1, output[-3000:]  # three 404s
    total = GOOD + BAD
    frames = [f for f in output.split("\r") if f"/{total} lines" in f]
    assert len(frames) >= 2, output[-3000:]  # redrawn in place, not once
    last = frames[-1]
    assert "100%|" in last and f"{total}/{total} lines" in last, last
    assert "img/s" in last and "MB/s" in last, last
    assert f"saved {GOOD}" in last and f"failed {BAD} (http_error {BAD})" in last, last
    # an ETA was shown while it ran: "[elapsed<remaining, ...]"
    assert any("<00:" in f for f in frames[:-1]), frames[:3]
    # log lines are written above the bar, never glued to its end (a new user's trial
    # found "0 lines [00:00]2026-...  run started" before they were)
    for frame in output.split("\r"):
        assert not re.search(r"(lines \[[^\]]*\]|\))\s*\S*\d{4}-\d\d-\d\dT", frame), frame
    assert "run started" in output and "run finished" in output
    # the bar stays, and the summary follows it
    assert "imgdl: 303 lines: 300 saved" in output
    assert len(read_manifest(outdir)) == total


def _progress_lines(stderr: str) -> list[dict[str, Any]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "progress":
                found.append(record)
    return found


def test_piped_progress_is_a_log_line_every_interval(tmp_path: Path, server: DevServer) -> None:
    urls = _list(tmp_path, server)
    with open(urls, "a", encoding="utf-8") as handle:
        handle.write("not a url\nftp://example.org/x.jpg\n")  # failed by the parent itself
    outdir = tmp_path / "out"
    result = run_cli(
        "fetch",
        str(urls),
        "-o",
        str(outdir),
        "--processes",
        "2",
        "--concurrency",
        "8",
        "--shard-size",
        "50",
        env=clean_env(IMGDL_LOG_PROGRESS_INTERVAL="0.2"),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    progress = _progress_lines(result.stderr)
    assert len(progress) >= 3, result.stderr[-3000:]
    done = [p["done"] for p in progress]
    assert done == sorted(done) and done[0] < done[-1]
    assert any(0 < n < GOOD for n in done), done  # seen mid-run, fed by the workers
    final = progress[-1]
    summary = read_summary(outdir)
    assert final["done"] == final["total"] == summary["lines"] == GOOD + BAD + 2
    assert final["saved"] == summary["saved"] == GOOD
    assert final["failed_by_reason"] == {"http_error": BAD, "invalid_url": 2}
    assert final["bytes"] == summary["bytes"]
    assert final["role"] == "parent"
    for key in ("images_per_s", "mb_per_s", "eta_s", "elapsed_s", "skipped", "resumed"):
        assert key in final


def test_resumed_lines_count_as_done(tmp_path: Path, server: DevServer) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(40)])
    outdir = tmp_path / "out"
    env = clean_env(IMGDL_LOG_PROGRESS_INTERVAL="0.2")
    assert run_cli("fetch", str(urls), "-o", str(outdir), env=env).returncode == 0
    with open(urls, "a", encoding="utf-8") as handle:
        handle.write("".join(f"{server.url}/i/{n}.jpg\n" for n in range(40, 50)))
    result = run_cli("fetch", str(urls), "-o", str(outdir), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    final = _progress_lines(result.stderr)[-1]
    assert final["resumed"] == 40 and final["saved"] == 10
    # a run shorter than one interval still has its rates in the final line
    assert final["images_per_s"] > 0 and final["mb_per_s"] > 0
    assert final["done"] == final["total"] == 50


def test_no_progress_and_quiet(tmp_path: Path, server: DevServer) -> None:
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(30)])
    env = clean_env(IMGDL_LOG_PROGRESS_INTERVAL="0.05")
    off = run_cli("fetch", str(urls), "-o", str(tmp_path / "a"), "--no-progress", env=env)
    assert off.returncode == 0, off.stderr[-3000:]
    assert _progress_lines(off.stderr) == []
    assert "imgdl: 30 lines: 30 saved" in off.stderr
    quiet = run_cli("fetch", str(urls), "-o", str(tmp_path / "b"), "--quiet", env=env)
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert read_summary(tmp_path / "b")["saved"] == 30
    # --quiet with an explicit --progress: progress lines, still no summary
    both = run_cli("fetch", str(urls), "-o", str(tmp_path / "c"), "-q", "--progress", env=env)
    assert both.returncode == 0
    assert _progress_lines(both.stderr) and "imgdl: 30 lines" not in both.stderr


def test_count_lines_estimates_plain_and_gzipped_lists(tmp_path: Path) -> None:
    import gzip

    plain = tmp_path / "a.txt"
    plain.write_bytes(b"".join(b"http://h/%d\n" % n for n in range(1000)))
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert count_lines([str(plain), str(packed)]) == 2000
    assert count_lines([str(plain), "-"]) is None
    assert count_lines([str(plain)], tasks=4) == 250  # one task of four takes about 1/4
