"""Regressions found in review: each test would have caught its bug."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader.devserver import DevServer
from downloader.proctree import descendants, running, workers
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, start_cli, write_list
from tests.rawserver import RawServer


@pytest.fixture
def latin1_server() -> Iterator[RawServer]:
    srv = RawServer(b"HTTP/1.1 404 Non trouv\xe9\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    yield srv
    srv.stop()


def test_undecodable_reason_phrase_does_not_hang(
    latin1_server: RawServer, server: DevServer, tmp_path: Path
) -> None:
    urls = [f"http://127.0.0.1:{latin1_server.port}/x/{n}" for n in range(6)]
    urls += [f"{server.url}/i/{n}.jpg" for n in range(20)]
    urls += [urls[0]]  # a duplicate quotes its first line's error, undecodable bytes too
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--concurrency", "4", timeout=60)
    assert result.returncode == 1, result.stderr
    summary = read_summary(out)
    assert (summary["saved"], summary["by_reason"]) == (20, {"http_error": 7})
    last = next(r for r in read_manifest(out) if r["line"] == len(urls))
    assert last["error"] == (f"same URL as {listing}:1, which failed: HTTP 404 Non trouv\udce9")


def test_sigterm_while_stdin_is_blocked(server: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        "-",
        "-o",
        str(out),
        stdin=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write("".join(f"{server.url}/i/{n}.jpg\n" for n in range(5)).encode())
        proc.stdin.flush()  # and the pipe stays open: the writer is slow
        deadline = time.monotonic() + 20
        while len(server.requests) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.requests) == 5  # the partial shard went out after shard_linger
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)  # stdin stays open: the input is not over
    finally:
        proc.kill()
    assert code == 143
    assert read_summary(out)["saved"] == 5
    assert read_summary(out)["input_complete"] is False


def test_second_run_on_the_same_folder_is_refused(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/block/{n}" for n in range(2)])
    out = tmp_path / "out"
    first = start_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        env=clean_env(),
    )
    try:
        deadline = time.monotonic() + 20
        while server.blocked < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli("fetch", str(listing), "-o", str(out))
        assert second.returncode == 2
        assert "another imgdl run is using the output folder" in second.stderr
        server.release()
        assert first.wait(30) == 0
    finally:
        server.release()
        first.kill()
    assert read_summary(out)["saved"] == 2


def test_parent_killed_leaves_no_worker_behind(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/slow/200/{n}" for n in range(400)])
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "100",
        "--concurrency",
        "4",
        env=clean_env(),
    )
    deadline = time.monotonic() + 20
    while len(server.requests) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pids = workers(proc.pid)
    assert worker_pids
    # the fork server the workers come from, and multiprocessing's resource tracker
    helpers = [pid for pid in descendants(proc.pid) if pid not in (proc.pid, *worker_pids)]
    assert len(helpers) == 2, helpers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(5)
    time.sleep(3)  # a worker notices within 0.1 s, then finishes what is in flight
    seen = len(server.requests)
    time.sleep(1.5)
    assert len(server.requests) == seen  # nobody is fetching any more
    assert seen < 400
    orphans = [pid for pid in worker_pids if os.path.exists(f"/proc/{pid}")]
    assert orphans == []  # and the idle workers left instead of waiting forever
    assert [pid for pid in helpers if running(pid)] == []  # and the helpers after them


def test_gzip_on_a_pipe_that_hands_over_one_byte_first(server: DevServer, tmp_path: Path) -> None:
    body = gzip.compress("".join(f"{server.url}/i/{n}.jpg\n" for n in range(5)).encode())
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        "-",
        "-o",
        str(out),
        stdin=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stdin is not None
    proc.stdin.write(body[:1])
    proc.stdin.flush()
    time.sleep(0.3)
    proc.stdin.write(body[1:])
    proc.stdin.close()
    assert proc.wait(60) == 0
    assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    assert read_summary(out)["saved"] == 5


def test_overlong_line_json_array_and_quoted_header(server: DevServer, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"http://x/" + b"a" * (2 << 20) + b"\n" + f"{server.url}/i/1.jpg\n".encode())
    out = tmp_path / "out"
    result = run_cli("fetch", str(big), "-o", str(out))
    assert result.returncode == 1
    records = sorted(read_manifest(out), key=lambda r: r["line"])
    assert [(r["line"], r["reason"]) for r in records] == [(1, "invalid_url"), (2, None)]
    assert "longer than" in records[0]["error"]

    array = tmp_path / "list.json"
    array.write_text('[{"url": "http://127.0.0.1:9/a.jpg"}]\n')
    result = run_cli("fetch", str(array), "-o", str(tmp_path / "o2"))
    assert result.returncode == 2
    assert "JSON array" in result.stderr

    quoted = tmp_path / "list.data"
    quoted.write_text(f'"id", "url"\n1,{server.url}/i/2.jpg\n')
    result = run_cli("fetch", str(quoted), "-o", str(tmp_path / "o3"))
    assert result.returncode == 0, result.stderr


def test_infinite_timeout_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli("fetch", "-", "--timeout", "inf", "-o", str(tmp_path / "o"), stdin=b"")
    assert result.returncode == 2
    assert "total_timeout" in result.stderr or "--timeout" in result.stderr


@pytest.mark.slow
def test_shards_that_never_started_are_not_charged(server: DevServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/block/{n}" for n in range(4)] + [
        f"{server.url}/i/{n}.jpg" for n in range(8)
    ]
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "1",
        "--shard-size",
        "4",
        env=clean_env(IMGDL_RUN_SHARDS_IN_FLIGHT="3"),
    )
    try:
        for round_ in (1, 2):
            deadline = time.monotonic() + 20
            while server.blocked < 4 * round_ and time.monotonic() < deadline:
                time.sleep(0.05)
            for child in workers(proc.pid):
                os.kill(child, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        server.release()
        proc.kill()
    records = {r["line"]: r for r in read_manifest(out)}
    assert {records[n]["reason"] for n in range(1, 5)} == {"worker_crashed"}
    assert {records[n]["status"] for n in range(5, 13)} == {"saved"}, stderr.decode()


def test_rate_below_one_per_second(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(2)])
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"), "--rate", "0.5")
    assert result.returncode == 0, result.stderr
    first, second = sorted(t for t, _, _ in server.requests)
    assert second - first >= 1.8


def test_the_same_input_twice_is_refused(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", ["http://127.0.0.1:9/a.jpg"])
    result = run_cli("fetch", str(listing), str(listing), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "given twice" in result.stderr


def test_a_named_pipe_is_read_whole(server: DevServer, tmp_path: Path) -> None:
    fifo = tmp_path / "urls.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as handle:
            handle.write("".join(f"{server.url}/i/{n}.jpg\n" for n in range(400)))

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = run_cli("fetch", str(fifo), "-o", str(tmp_path / "out"), "--processes", "2")
    writer.join(10)
    assert result.returncode == 0, result.stderr
    assert read_summary(tmp_path / "out")["saved"] == 400


def test_lines_read_but_not_sent_are_recorded_when_stopped(
    server: DevServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        "-",
        "-o",
        str(out),
        stdin=subprocess.PIPE,
        env=clean_env(IMGDL_RUN_SHARD_LINGER="60"),
    )
    assert proc.stdin is not None
    proc.stdin.write("".join(f"{server.url}/i/{n}.jpg\n" for n in range(3)).encode())
    proc.stdin.flush()
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    records = read_manifest(out)
    assert [(r["line"], r["reason"]) for r in sorted(records, key=lambda r: r["line"])] == [
        (1, "interrupted"),
        (2, "interrupted"),
        (3, "interrupted"),
    ]


def test_a_slow_host_does_not_hold_back_the_others(tmp_path: Path) -> None:
    slow, fast = DevServer(host="127.0.0.1").start(), DevServer(host="127.0.0.2").start()
    try:
        urls = [f"{slow.url}/i/{n}.jpg" for n in range(5)] + [
            f"{fast.url}/i/{n}.jpg" for n in range(20)
        ]
        listing = write_list(tmp_path / "u.txt", urls)
        config = tmp_path / "l.yaml"
        config.write_text("limits:\n  rate: 50\n  hosts:\n    127.0.0.1: {rate: 1}\n")
        started = time.monotonic()
        result = run_cli(
            "fetch", str(listing), "-o", str(tmp_path / "out"), "--config", str(config)
        )
        assert result.returncode == 0, result.stderr
        assert max(t for t, _, _ in fast.requests) - started < 4  # not behind the slow host
        assert time.monotonic() - started >= 4  # the slow host still got its 1/s
    finally:
        slow.stop()
        fast.stop()


def test_odd_records_in_an_old_manifest_neither_crash_nor_leak(
    server: DevServer, tmp_path: Path
) -> None:
    """A valid-JSON line with a status that is not a string crashed every later run in
    the folder; a record from an older version (fewer fields) went into the manifest as
    it was. Now the first is dropped and the second gets every column (review of issue 5)."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(3)])
    out = tmp_path / "out"
    assert run_cli("fetch", str(listing), "-o", str(out)).returncode == 0
    manifest = out / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    dropped = ("etag", "final_url", "duplicate_of", "width", "height", "finished_at")
    old = {k: v for k, v in records[0].items() if k not in dropped}
    odd = {**records[1], "status": {"v": "saved"}}
    manifest.write_text("\n".join(json.dumps(r) for r in [old, odd, records[2]]) + "\n")
    result = run_cli("fetch", str(listing), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    after = read_manifest(out)
    assert sorted(r["line"] for r in after) == [1, 2, 3]
    assert all(r.keys() == records[2].keys() for r in after)
