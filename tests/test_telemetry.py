"""OpenTelemetry log export from every process, against a real OTLP/HTTP receiver.

The requirement: log records are exported from every worker process, which proves
that the flush at the end of each shard happens (pool workers leave through
``os._exit``-like paths where no atexit hook runs). The schedule delays are set to a
minute, so a record can only reach the receiver through that explicit flush.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from downloader.devserver import DevServer
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, write_list

URLS = 400
SHARD_SIZE = 50
SHARDS = URLS // SHARD_SIZE


def _value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (scalars; anything else as text)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("string_value", "bool_value", "int_value", "double_value", "bytes_value"):
        return getattr(value, kind)
    return str(getattr(value, kind))


@dataclasses.dataclass(frozen=True)
class ReceivedLog:
    resource: dict[str, Any]
    body: Any
    severity: str
    attributes: dict[str, Any]

    @property
    def pid(self) -> Any:
        return self.resource.get("process.pid")

    @property
    def role(self) -> Any:
        return self.resource.get("imgdl.role")

    @property
    def shard(self) -> Any:
        return self.resource.get("imgdl.shard")


class OtlpReceiver:
    """A minimal OTLP/HTTP collector on 127.0.0.1, in a background thread."""

    def __init__(self) -> None:
        self.port = 0
        self.logs: list[ReceivedLog] = []
        self.requests: list[tuple[str, str | None]] = []  # (path, Content-Encoding)
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[ReceivedLog]:
        with self._lock:
            return list(self.logs)

    @staticmethod
    def _decode_body(raw: bytes, encoding: str | None) -> bytes:
        # aiohttp may already have undone Content-Encoding; look at the bytes themselves.
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if encoding == "deflate":
            try:
                return zlib.decompress(raw)
            except zlib.error:
                return raw
        return raw

    async def _logs(self, request: web.Request) -> web.Response:
        encoding = request.headers.get("Content-Encoding")
        raw = await request.read()
        with self._lock:
            self.requests.append((request.path, encoding))
        try:
            message = ExportLogsServiceRequest()
            message.ParseFromString(self._decode_body(raw, encoding))
        except Exception as exc:  # recorded and asserted on by the tests
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=400, text="bad request")
        received: list[ReceivedLog] = []
        for resource_logs in message.resource_logs:
            resource = {a.key: _value(a.value) for a in resource_logs.resource.attributes}
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    received.append(
                        ReceivedLog(
                            resource=resource,
                            body=_value(record.body),
                            severity=record.severity_text,
                            attributes={a.key: _value(a.value) for a in record.attributes},
                        )
                    )
        with self._lock:
            self.logs.extend(received)
        return web.Response(
            body=ExportLogsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _other(self, request: web.Request) -> web.Response:
        await request.read()
        with self._lock:
            self.requests.append((request.path, request.headers.get("Content-Encoding")))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def _start_async(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/logs", self._logs)
        app.router.add_post("/v1/traces", self._other)
        app.router.add_post("/v1/metrics", self._other)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def start(self) -> OtlpReceiver:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start_async())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("OTLP receiver did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None


class SilentListener:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung collector)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-otlp", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)  # held open, never read from nor written to

    def start(self) -> SilentListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()
        self._sock.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    rcv = OtlpReceiver().start()
    try:
        yield rcv
    finally:
        rcv.stop()


@pytest.fixture
def silent_collector() -> Iterator[SilentListener]:
    listener = SilentListener().start()
    try:
        yield listener
    finally:
        listener.stop()


def _url_list(tmp_path: Path, server: DevServer) -> Path:
    return write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(URLS)])


def _assert_all_saved(outdir: Path) -> None:
    records = read_manifest(outdir)
    assert len(records) == URLS
    assert sorted(r["line"] for r in records) == list(range(1, URLS + 1))
    assert {r["status"] for r in records} == {"saved"}, {
        (r["status"], r.get("reason")) for r in records
    }
    summary = read_summary(outdir)
    assert summary["exit_code"] == 0, summary


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_every_worker_process_exports_its_logs(
    tmp_path: Path, server: DevServer, receiver: OtlpReceiver, compression: str
) -> None:
    urls = _url_list(tmp_path, server)
    outdir = tmp_path / "out"
    env = clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_EXPORTER_OTLP_COMPRESSION=compression,
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
    )
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "2",
        "--shard-size",
        str(SHARD_SIZE),
        # debug: the parent logs "shard done" per shard, so it exports records too
        "--log-level",
        "debug",
        "-o",
        str(outdir),
        env=env,
        timeout=90,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_all_saved(outdir)
    # Every flush is synchronous and bounded: nothing may still be on its way.
    assert elapsed < 60, elapsed

    logs = receiver.snapshot()
    assert not receiver.errors, receiver.errors
    assert receiver.requests, "the receiver got no export at all"
    assert {path for path, _ in receiver.requests} <= {"/v1/logs", "/v1/traces", "/v1/metrics"}
    encodings = {encoding for path, encoding in receiver.requests if path == "/v1/logs"}
    assert encodings == ({"gzip"} if compression == "gzip" else {None}), encodings

    # The parent (the CLI process itself) exported its own records.
    parent = [r for r in logs if r.role == "parent"]
    assert parent, "no log record from the parent process"
    parent_pids = {r.pid for r in parent}
    assert len(parent_pids) == 1, parent_pids
    (parent_pid,) = parent_pids
    assert isinstance(parent_pid, int) and parent_pid > 0
    assert "shard done" in {r.body for r in parent}

    # Each worker process exported records, from its own pid.
    workers = [r for r in logs if r.role == "worker"]
    worker_pids = {r.pid for r in workers}
    assert all(isinstance(pid, int) and pid > 0 for pid in worker_pids), worker_pids
    assert len(worker_pids) >= 2, worker_pids
    assert parent_pid not in worker_pids
    assert len(worker_pids) <= 2, worker_pids  # --processes 2, and no worker died

    # Every shard's last record ("shard finished") arrived: the flush at shard end worked.
    assert {r.shard for r in workers} == set(range(SHARDS))
    finished = [r for r in workers if r.body == "shard finished"]
    assert sorted(r.shard for r in finished) == list(range(SHARDS))
    started_ = [r for r in workers if r.body == "shard started"]
    assert sorted(r.shard for r in started_) == list(range(SHARDS))
    for record in finished:
        assert record.severity == "INFO"
        assert record.resource.get("service.name") == "imgdl"
        assert record.attributes.get("shard") == record.shard
        assert record.attributes.get("pid") == record.pid
        assert "saved" in str(record.attributes.get("counts")), record.attributes
    # ... and all of each shard's per-URL records came with it.
    url_done = [r for r in workers if r.body == "url done"]
    assert len(url_done) == URLS
    for shard in range(SHARDS):
        assert sum(1 for r in url_done if r.shard == shard) == SHARD_SIZE


@pytest.mark.slow
def test_run_finishes_when_the_collector_never_answers(
    tmp_path: Path, server: DevServer, silent_collector: SilentListener
) -> None:
    urls = _url_list(tmp_path, server)
    outdir = tmp_path / "out"
    env = clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=silent_collector.endpoint,
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
        OTEL_BSP_SCHEDULE_DELAY="60000",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
    )
    started = time.monotonic()
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "2",
        "--shard-size",
        str(SHARD_SIZE),
        "-o",
        str(outdir),
        env=env,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-4000:]
    _assert_all_saved(outdir)
    # The exporters really tried to reach the hung collector.
    assert silent_collector.accepted, "no connection to the collector was attempted"
    assert elapsed < 60, elapsed


def test_run_finishes_when_the_collector_port_is_closed(tmp_path: Path, server: DevServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound, never listened on, then released
    urls = write_list(tmp_path / "urls.txt", [f"{server.url}/i/{n}.jpg" for n in range(40)])
    outdir = tmp_path / "out"
    env = clean_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{closed_port}",
        OTEL_EXPORTER_OTLP_TIMEOUT="2",
        OTEL_BLRP_SCHEDULE_DELAY="60000",
    )
    result = run_cli(
        "fetch",
        str(urls),
        "--processes",
        "1",
        "--shard-size",
        "20",
        "-o",
        str(outdir),
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_manifest(outdir)
    assert len(records) == 40
    assert {r["status"] for r in records} == {"saved"}
