"""Shared fixtures: a real image server on 127.0.0.1 and a way to run the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from downloader.devserver import ALLOW_LOOPBACK, DevServer
from downloader.proxy import PROXY_ENV
from tests.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[DevServer]:
    with DevServer() as srv:
        yield srv


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP collector on 127.0.0.1 (tests/otlp_receiver.py)."""
    with OtlpReceiver() as rcv:
        yield rcv


#: The test servers live on loopback, which the network policy refuses by default.
LOOPBACK_ALLOWED = ALLOW_LOOPBACK


#: This machine's own trust store and proxy settings: a test sets them itself when it
#: is about them, and must not pass or fail by what the machine it runs on has.
_MACHINE_ONLY = frozenset({"SSL_CERT_FILE", "SSL_CERT_DIR", *PROXY_ENV})


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI run: no stray IMGDL_/OTEL_ settings, none of this
    machine's proxy or trust-store variables, loopback allowed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMGDL_", "OTEL_")) and k not in _MACHINE_ONLY
    }
    env.update(LOOPBACK_ALLOWED)
    env.update(extra)
    return env


def run_cli(
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 90,
) -> subprocess.CompletedProcess[str]:
    """Run ``imgdl ARGS`` as a real subprocess and wait for it."""
    done = subprocess.run(
        [sys.executable, "-m", "downloader", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args,
        done.returncode,
        done.stdout.decode(errors="replace"),
        done.stderr.decode(errors="replace"),
    )


#: ``python -m downloader ARGS`` with the stop signals at their defaults (the
#: dispositions set here hold across the exec).
_WITH_DEFAULT_STOP_SIGNALS = """
import os, signal, sys
for stop in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(stop, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, "-m", "downloader", *sys.argv[1:]])
"""


def start_cli(
    *args: str, stdin: int = subprocess.DEVNULL, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``imgdl ARGS`` as a real subprocess and return at once (stderr is piped).

    It starts with SIGHUP, SIGINT and SIGTERM at their defaults, as from a terminal,
    whatever this process has: imgdl keeps a stop signal ignored when it was ignored
    at its start (as under nohup), and a test run started under nohup made the test
    of SIGHUP fail."""
    return subprocess.Popen(
        [sys.executable, "-c", _WITH_DEFAULT_STOP_SIGNALS, *args],
        stdin=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env if env is not None else clean_env(),
    )


def run_in_namespace(script: str, *args: str) -> dict[str, Any]:
    """Run ``tests/SCRIPT ARGS`` in a network and mount namespace of its own (``unshare
    -n -m``: only ``lo``, nothing leaves the machine) and return the JSON object it
    prints last; skips the test where no namespace can be made."""
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        ["unshare", "-n", "-m", sys.executable, str(REPO / "tests" / script), *args],
        capture_output=True,
        text=True,
        env={**clean_env(), "PYTHONPATH": str(REPO)},
        timeout=180,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def crash(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it at once (the parent and every worker),
    but multiprocessing's resource tracker: a crashed machine's /dev/shm goes with it,
    and the tracker, left to see its run gone, removes the run's semaphores there
    (killed too, it left a dozen behind per test run on the machine running the tests)."""
    from downloader.proctree import descendants

    for found in descendants(pid):
        try:
            command = Path(f"/proc/{found}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in command:
            os.kill(found, signal.SIGKILL)


class HeadRead(NamedTuple):
    """What the builtin client made of an answer's head (``read_head``)."""

    headers: list[tuple[str, str]]  # empty when refused
    error: Exception | None
    closed: bool  # the connection


class FakeTransport:
    """A transport for the builtin client's connection that sends nothing: what is
    written goes to ``log`` (a list several transports may share), tagged ``label``."""

    def __init__(self, log: list[tuple[object, bytes]] | None = None, label: object = None):
        self.log = [] if log is None else log
        self.label = label
        self.closed = False

    def write(self, data: bytes) -> None:
        self.log.append((self.label, data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def read_head(answer: bytes) -> HeadRead:
    """Feed ``answer`` to the builtin client's real connection and llhttp parser in one
    read, over a transport that sends nothing, and read the response's head."""
    import asyncio

    from downloader.httpclient import HttpClient, Response, _Connection
    from downloader.netpolicy import NetworkPolicy
    from downloader.settings import Settings

    async def scenario() -> HeadRead:
        client = HttpClient(Settings(), NetworkPolicy())
        connection = _Connection(client, ("http", "example.test", 80))
        transport = FakeTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        response = Response(connection, client.loop.time() + 5, 5)
        connection.ask(response, b"GET / HTTP/1.1\r\n\r\n")
        connection.data_received(answer)
        try:
            await response._read_head()
        except Exception as exc:
            return HeadRead([], exc, transport.closed)
        return HeadRead(list(response.headers.items()), None, transport.closed)

    return asyncio.run(scenario())


def semaphores() -> set[str]:
    """multiprocessing's named semaphores in /dev/shm (a run makes a few)."""
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def kill_9_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool]) -> None:
    """SIGKILL ``proc`` and every process below it (the workers), at once, when
    ``condition`` holds (or after 30 s): a crash of the whole run, mid-way. A run that
    ends first is not waited on: the caller sees that nothing was killed."""
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        crash(proc.pid)
        proc.wait(10)
    finally:
        proc.kill()


def quiet_count(count: Callable[[], int], quiet: float = 0.3, timeout: float = 10) -> int:
    """``count()`` once it has not changed for ``quiet`` seconds: after a kill, a server
    may still log a request that a dead client sent just before."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def read_manifest(outdir: Path) -> list[dict[str, Any]]:
    with open(outdir / "manifest.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_summary(outdir: Path) -> dict[str, Any]:
    return json.loads((outdir / "summary.json").read_text(encoding="utf-8"))


def image_files(outdir: Path) -> list[Path]:
    """Files under OUTDIR that are downloads (not the run's own records)."""
    own = {"manifest.jsonl", "failures.txt", "summary.json", "report.html"}
    return sorted(
        p
        for p in outdir.rglob("*")
        if p.is_file()
        and p.name not in own
        and p.relative_to(outdir).parts[0] not in (".imgdl", "previous-runs")
    )


def write_list(path: Path, urls: list[str]) -> Path:
    path.write_text("\n".join(urls) + "\n", encoding="utf-8")
    return path


def run_fetch(tmp_path: Path, urls: list[str], **env: str) -> tuple[Any, Path]:
    """``imgdl fetch`` of ``urls`` into tmp_path/out with debug logs, in clean_env(**env)."""
    listing = write_list(tmp_path / "u.txt", urls)
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), "--log-level", "debug", env=clean_env(**env)
    )
    return result, out


def kill_after_requests(proc: subprocess.Popen[bytes], server: DevServer, count: int) -> int:
    """SIGKILL ``proc`` and all its workers at once when ``server`` has seen ``count``
    requests (or after 30 s); the requests seen by then."""
    kill_9_when(proc, lambda: len(server.requests) >= count)
    return quiet_count(lambda: len(server.requests))
