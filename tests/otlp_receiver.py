"""A minimal OTLP/HTTP collector on 127.0.0.1 for tests: logs, spans and metric points.

It decodes the protobuf payloads with ``opentelemetry-proto`` (the real wire
format, as a collector would) and keeps what arrived, with the resource of each
item, so a test can ask which process sent what.
"""

from __future__ import annotations

import dataclasses
import gzip
import socket
import threading
import zlib
from collections.abc import Callable
from typing import Any

from aiohttp import web
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from downloader.devserver import BackgroundApp


def _value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue`` (scalars; anything else as text)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("string_value", "bool_value", "int_value", "double_value", "bytes_value"):
        return getattr(value, kind)
    return str(getattr(value, kind))


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclasses.dataclass(frozen=True)
class _FromProcess:
    resource: dict[str, Any]

    @property
    def pid(self) -> Any:
        return self.resource.get("process.pid")

    @property
    def role(self) -> Any:
        return self.resource.get("imgdl.role")


@dataclasses.dataclass(frozen=True)
class ReceivedLog(_FromProcess):
    body: Any
    severity: str
    attributes: dict[str, Any]

    @property
    def shard(self) -> Any:
        return self.attributes.get("shard")


@dataclasses.dataclass(frozen=True)
class ReceivedSpan(_FromProcess):
    name: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    kind: int
    status_code: int
    attributes: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReceivedPoint(_FromProcess):
    """One data point of one metric in one export (cumulative: the last one counts)."""

    metric: str
    unit: str
    kind: str
    attributes: dict[str, Any]
    value: float
    count: int = 0


def _logs(message: ExportLogsServiceRequest) -> list[Any]:
    found: list[Any] = []
    for group in message.resource_logs:
        resource = _attributes(group.resource.attributes)
        for scope in group.scope_logs:
            for record in scope.log_records:
                found.append(
                    ReceivedLog(
                        resource=resource,
                        body=_value(record.body),
                        severity=record.severity_text,
                        attributes=_attributes(record.attributes),
                    )
                )
    return found


def _spans(message: ExportTraceServiceRequest) -> list[Any]:
    found: list[Any] = []
    for group in message.resource_spans:
        resource = _attributes(group.resource.attributes)
        for scope in group.scope_spans:
            for span in scope.spans:
                found.append(
                    ReceivedSpan(
                        resource=resource,
                        name=span.name,
                        trace_id=span.trace_id,
                        span_id=span.span_id,
                        parent_span_id=span.parent_span_id,
                        kind=span.kind,
                        status_code=span.status.code,
                        attributes=_attributes(span.attributes),
                    )
                )
    return found


def _points(message: ExportMetricsServiceRequest) -> list[Any]:
    found: list[Any] = []
    for group in message.resource_metrics:
        resource = _attributes(group.resource.attributes)
        for scope in group.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                for point in getattr(metric, kind).data_points:
                    if kind == "histogram":
                        value, count = point.sum, point.count
                    else:
                        value = (
                            point.as_int
                            if point.WhichOneof("value") == "as_int"
                            else point.as_double
                        )
                        count = 0
                    found.append(
                        ReceivedPoint(
                            resource=resource,
                            metric=metric.name,
                            unit=metric.unit,
                            kind=kind,
                            attributes=_attributes(point.attributes),
                            value=value,
                            count=count,
                        )
                    )
    return found


_SIGNALS: dict[str, tuple[type[Message], type[Message], Callable[[Any], list[Any]]]] = {
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse, _logs),
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse, _spans),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse, _points),
}


class OtlpReceiver(BackgroundApp):
    """The collector, serving in a background thread; ``logs``, ``spans`` and
    ``points`` read what arrived."""

    def __init__(self) -> None:
        self.received: dict[str, list[Any]] = {path: [] for path in _SIGNALS}
        #: (path, Content-Encoding, headers) of every export request
        self.requests: list[tuple[str, str | None, dict[str, str]]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[ReceivedLog]:
        with self._lock:
            return list(self.received["/v1/logs"])

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.received["/v1/traces"])

    def points(self) -> list[ReceivedPoint]:
        with self._lock:
            return list(self.received["/v1/metrics"])

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

    async def _export(self, request: web.Request) -> web.Response:
        encoding = request.headers.get("Content-Encoding")
        raw = await request.read()
        with self._lock:
            self.requests.append((request.path, encoding, dict(request.headers)))
        request_type, response_type, decode = _SIGNALS[request.path]
        try:
            message = request_type()
            message.ParseFromString(self._decode_body(raw, encoding))
            items = decode(message)
        except Exception as exc:  # recorded and asserted on by the tests
            with self._lock:
                self.errors.append(f"{request.path}: {type(exc).__name__}: {exc}")
            return web.Response(status=400, text="bad request")
        with self._lock:
            self.received[request.path].extend(items)
        return web.Response(
            body=response_type().SerializeToString(), content_type="application/x-protobuf"
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in _SIGNALS:
            app.router.add_post(path, self._export)
        return app


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
