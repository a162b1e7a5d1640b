"""Limits that hold for the whole run across processes, checked where it counts: at the server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader.devserver import DevServer, busiest_window
from tests.conftest import read_manifest, run_cli, write_list


@pytest.fixture
def three_hosts() -> Iterator[list[DevServer]]:
    servers = [DevServer(host=f"127.0.0.{i}").start() for i in (1, 2, 3)]
    try:
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.mark.slow
def test_run_rate_holds_across_two_processes(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(200)])
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--rate",
        "20",
        "--shard-size",
        "50",
    )
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    times = [t for t, _, _ in server.requests]
    assert len(times) == 200
    assert busiest_window(times) <= 44
    assert wall <= 1.3 * 10
    # both processes did the work: the limit is not held by running on one
    assert len({r["path"] for r in read_manifest(out)}) == 200


@pytest.mark.slow
def test_per_host_rates_hold_at_once(three_hosts: list[DevServer], tmp_path: Path) -> None:
    a, b, c = three_hosts
    # 8 s of work per host at its own rate: 10/s, 5/s (override), 20/s (override)
    # interleaved in proportion, so that every host has work until the end
    urls = []
    for n in range(40):
        urls.append(f"{b.url}/i/{n}.jpg")
        urls += [f"{a.url}/i/{2 * n + k}.jpg" for k in range(2)]
        urls += [f"{c.url}/i/{4 * n + k}.jpg" for k in range(4)]
    listing = write_list(tmp_path / "u.txt", urls)
    config = tmp_path / "limits.yaml"
    config.write_text(
        "limits:\n  per_host_rate: 10\n  hosts:\n"
        "    127.0.0.2: {rate: 5}\n    127.0.0.3: {rate: 20}\n"
    )
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "40",
        "--config",
        str(config),
    )
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    for srv, rate, count in ((a, 10, 80), (b, 5, 40), (c, 20, 160)):
        times = [t for t, _, _ in srv.requests]
        assert len(times) == count
        assert busiest_window(times) <= 2 * rate * 1.1, (srv.host, busiest_window(times))
    assert wall <= 1.3 * 8


def test_per_host_connections_hold_across_processes(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/slow/150/{n}" for n in range(60)])
    out = tmp_path / "out"
    result = run_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--processes",
        "2",
        "--shard-size",
        "10",
        "--concurrency",
        "16",
        "--per-host-connections",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert server.max_inflight == 3
    assert len(read_manifest(out)) == 60


def test_busiest_window_helper() -> None:
    assert busiest_window([0.0, 0.5, 1.9, 2.0, 2.1]) == 4
    assert busiest_window([]) == 0


def test_a_lock_left_held_by_a_dead_worker_is_recovered() -> None:
    import multiprocessing

    from downloader.limits import SharedLimits

    shared = SharedLimits.create(multiprocessing.get_context("spawn"))
    shared.host_connections[5] = 3
    holder = multiprocessing.get_context("spawn").Process(target=_take_and_die, args=(shared,))
    holder.start()
    holder.join(10)
    assert holder.exitcode == 0
    assert not shared.lock.acquire(timeout=0.1)  # held by a process that is gone
    shared.reset_after_crash()
    assert shared.host_connections[5] == 0
    assert shared.lock.acquire(timeout=1)
    shared.lock.release()


def _take_and_die(shared: object) -> None:
    import os

    shared.lock.acquire()  # type: ignore[attr-defined]
    os._exit(0)


@pytest.mark.parametrize(
    "configured", ["bücher.example", "xn--bcher-kva.example", "BÜCHER.example"]
)
def test_a_host_limit_applies_to_every_spelling_of_the_host(configured: str) -> None:
    """The fetcher asks for the host as it goes on the wire (IDNA); a limit configured
    in Unicode or in punycode is the same host (review of issue 5: after a change to
    yarl's decoded host, punycode keys stopped matching)."""
    import multiprocessing

    from yarl import URL

    from downloader.limits import Limiter, SharedLimits
    from downloader.settings import LimitsSettings

    settings = LimitsSettings.model_validate(
        {"hosts": {configured: {"rate": 0.5, "connections": 1}}}
    )
    limiter = Limiter(settings, SharedLimits.create(multiprocessing.get_context("spawn")))
    for url in ("http://bücher.example/a.jpg", "http://xn--bcher-kva.example/a.jpg"):
        host = URL(url).raw_host or ""
        assert (limiter.host_rate(host), limiter.host_connections(host)) == (0.5, 1), url
    assert (limiter.host_rate("example.org"), limiter.host_connections("example.org")) == (None, 0)
