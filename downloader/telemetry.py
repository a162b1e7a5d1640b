"""Logs, traces and metrics for every process: structlog on stderr, OpenTelemetry out.

Each process (the parent, each worker) has one :class:`Telemetry`: a logger, a
tracer and a meter provider, each exporting over OTLP/HTTP when the standard
``OTEL_*`` variables ask for it. Providers live as long as the process, so a
metric series is one per process, not one per shard. A worker flushes at the end
of every shard and shuts down at exit, itself and within a time bound, instead
of trusting the SDK's atexit hooks: a pool worker that is killed runs no exit
hook, and under the ``fork`` start method workers leave through ``os._exit``
(opentelemetry-python #4005). The bound matters because ``shutdown`` can hang
on an unreachable collector (#2284); after one flush has timed out, later ones
in the same process get a short bound, so a dead collector costs a shard well
under a second.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import structlog

from downloader import __version__
from downloader.outcomes import Outcome, Status

if TYPE_CHECKING:  # the SDK is imported only when a signal is exported (about 40 ms)
    from opentelemetry.sdk._logs import Logger as OtelLogger
    from opentelemetry.sdk.resources import Resource

#: Upper bound on the time a process spends flushing telemetry when it ends.
FLUSH_SECONDS = 5.0
#: The bound once a flush in this process has failed (the collector looks dead).
FLUSH_SECONDS_UNHEALTHY = 0.5

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: structlog method → OpenTelemetry SeverityNumber (its values, so that the SDK is not
#: imported when nothing is exported)
_SEVERITY = {"debug": 5, "info": 9, "warning": 13, "error": 17, "critical": 21}
_otel_logger: OtelLogger | None = None
_collector_healthy = True


#: Latency buckets of ``http.client.request.duration`` (seconds), as the HTTP semantic
#: conventions advise; the SDK's default buckets suit milliseconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


def otlp_wanted(signal: str, env: Mapping[str, str] = os.environ) -> bool:
    """Whether ``signal`` (logs, traces, metrics) is exported over OTLP.

    Only when the standard variables ask for it: an endpoint for all signals or
    for this one, or ``OTEL_<SIGNAL>_EXPORTER=otlp`` (which means the default
    endpoint, localhost:4318). ``OTEL_SDK_DISABLED=true`` and
    ``OTEL_<SIGNAL>_EXPORTER=none`` turn it off. A laptop run sends nothing.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return exporter == "otlp" or bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _to_otel(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: copy the record to the OpenTelemetry logger, if one is open."""
    logger = _otel_logger
    if logger is not None:
        from opentelemetry._logs import SeverityNumber

        attributes = {
            k: v if isinstance(v, str | bool | int | float) else str(v)
            for k, v in event.items()
            if k not in ("event", "level", "timestamp")
        }
        logger.emit(
            timestamp=time.time_ns(),
            severity_number=SeverityNumber(_SEVERITY.get(method, 9)),
            severity_text=method.upper(),
            body=str(event.get("event", "")),
            attributes=attributes,
        )
    return event


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Set up structlog for this process: JSON lines unless stderr is a terminal."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _to_otel,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the standard library (the OpenTelemetry exporters, when a
    # collector does not answer): the same format, so a JSON log stays JSON.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.WARNING, _LEVELS[level]))


def log_to(stream: TextIO) -> None:
    """Send this process's log lines (imgdl's and the libraries') to ``stream``: the
    progress bar's writer while a bar is on the terminal."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=stream))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def get_logger(**context: Any) -> Any:
    """A logger; without context it stays lazy, so it may be created before configuration."""
    logger = structlog.get_logger("imgdl")
    return logger.bind(**context) if context else logger


def resource_attributes(role: str, task_index: int | None) -> dict[str, str | int]:
    """What names this process in every signal: the service (unless ``OTEL_SERVICE_NAME``
    or ``OTEL_RESOURCE_ATTRIBUTES`` name it), the process, its role, and the index of
    its task when the job is split (see tasks.py)."""
    attributes: dict[str, str | int] = {
        "service.version": __version__,
        "process.pid": os.getpid(),
        "imgdl.role": role,
    }
    if task_index is not None:
        attributes["imgdl.task.index"] = task_index
    return attributes


def _resource(role: str, task_index: int | None) -> Resource:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(resource_attributes(role, task_index))
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "imgdl"}))
    return resource


def _url_attributes(url: str) -> dict[str, str | int]:
    """``url.full`` without credentials, ``server.address`` and ``server.port``."""
    parts = urlsplit(url)
    port = parts.port if parts.port is not None else (443 if parts.scheme == "https" else 80)
    netloc = parts.netloc.rpartition("@")[2]
    return {
        "url.full": urlunsplit(parts._replace(netloc=netloc)),
        "server.address": parts.hostname or "",
        "server.port": port,
    }


class Telemetry:
    """One process's OpenTelemetry providers and the instruments imgdl records into.

    Every signal is optional (see :func:`otlp_wanted`); with none wanted, nothing of
    OpenTelemetry is imported and every record method returns at once.
    """

    def __init__(self, role: str, task_index: int | None = None) -> None:
        self._providers: list[Any] = []
        self.logger: OtelLogger | None = None
        self.tracer: Any = None
        self._outcomes: Any = None
        self._bytes: Any = None
        self._duration: Any = None
        self._active: Any = None
        wanted = {signal for signal in ("logs", "traces", "metrics") if otlp_wanted(signal)}
        if not wanted:
            return
        resource = _resource(role, task_index)
        # Imported lazily: the exporters pull in requests and protobuf.
        if "logs" in wanted:
            from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

            logs = LoggerProvider(resource=resource, shutdown_on_exit=False)
            logs.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))
            self._providers.append(logs)
            self.logger = logs.get_logger("imgdl", __version__)  # type: ignore[assignment]
        if "traces" in wanted:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            traces = TracerProvider(resource=resource, shutdown_on_exit=False)
            traces.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            self._providers.append(traces)
            self.tracer = traces.get_tracer("imgdl", __version__)
        if "metrics" in wanted:
            self._open_metrics(resource)

    def _open_metrics(self, resource: Resource) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        metrics = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        self._providers.append(metrics)
        meter = metrics.get_meter("imgdl", __version__)
        self._outcomes = meter.create_counter(
            "imgdl.outcomes", unit="{url}", description="URLs finished, by status and reason"
        )
        self._bytes = meter.create_counter(
            "imgdl.saved.bytes", unit="By", description="Bytes of the images saved"
        )
        self._duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Time from the first request of a URL to its outcome",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._active = meter.create_up_down_counter(
            "http.client.active_requests", unit="{request}", description="Downloads in flight"
        )

    @property
    def enabled(self) -> bool:
        return bool(self._providers)

    def request_started(self) -> None:
        if self._active is not None:
            self._active.add(1)

    def request_ended(self) -> None:
        if self._active is not None:
            self._active.add(-1)

    def start_shard(self, shard_id: int, attempt: int, urls: int) -> Any:
        """The span of a shard (None without tracing); end it with :meth:`end_shard`."""
        if self.tracer is None:
            return None
        return self.tracer.start_span(
            "shard",
            attributes={
                "imgdl.shard.id": shard_id,
                "imgdl.shard.attempt": attempt,
                "imgdl.shard.urls": urls,
            },
        )

    def end_shard(self, span: Any, counts: Mapping[str, int]) -> None:
        if span is not None:
            for key, value in counts.items():
                span.set_attribute(f"imgdl.shard.outcomes.{key}", value)
            span.end()

    def count(self, outcome: Outcome) -> None:
        """One line's outcome in the ``imgdl.outcomes`` (and saved bytes) counters."""
        if self._outcomes is None:
            return
        labels = {"imgdl.outcome.status": outcome.status.value}
        if outcome.reason is not None:
            labels["imgdl.outcome.reason"] = outcome.reason.value
        self._outcomes.add(1, labels)
        if outcome.status is Status.SAVED:
            self._bytes.add(outcome.bytes)

    def url_done(self, outcome: Outcome, shard_span: Any, start_ns: int, end_ns: int) -> None:
        """One URL's span (a child of its shard's) and its metric points."""
        if not self._providers:
            return
        failed = outcome.status is Status.FAILED
        reason = outcome.reason.value if outcome.reason is not None else None
        common: dict[str, str | int] = {"http.request.method": "GET"}
        if outcome.http_status is not None:
            common["http.response.status_code"] = outcome.http_status
        if failed and reason is not None:
            common["error.type"] = reason
        if self._outcomes is not None:
            self.count(outcome)
            if outcome.attempts:  # a URL that went to the network
                self._duration.record((end_ns - start_ns) / 1e9, common)
        if self.tracer is not None and shard_span is not None:
            from opentelemetry import trace
            from opentelemetry.trace import SpanKind, StatusCode

            attributes: dict[str, str | int] = {
                **common,
                **_url_attributes(outcome.url),
                "imgdl.outcome.status": outcome.status.value,
                "imgdl.input.line": outcome.line,
                "imgdl.attempts": outcome.attempts,
                "imgdl.bytes": outcome.bytes,
            }
            if reason is not None:
                attributes["imgdl.outcome.reason"] = reason
            span = self.tracer.start_span(
                "GET",
                context=trace.set_span_in_context(shard_span),
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=start_ns,
            )
            if failed:
                span.set_status(StatusCode.ERROR, outcome.error or reason)
            span.end(end_time=end_ns)

    def flush(self, timeout: float | None = None) -> bool:
        """Export what is buffered, within ``timeout`` seconds; True if all was sent."""
        return self._bounded("force_flush", timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush and shut every provider down, within ``timeout`` seconds."""
        global _otel_logger, _active
        if _otel_logger is self.logger:
            _otel_logger = None
        if _active is self:
            _active = None
        sent = self._bounded("shutdown", timeout)
        self._providers = []
        return sent

    def _bounded(self, action: str, timeout: float | None) -> bool:
        global _collector_healthy
        if not self._providers:
            return True
        if timeout is None:
            timeout = FLUSH_SECONDS if _collector_healthy else FLUSH_SECONDS_UNHEALTHY
        deadline = time.monotonic() + timeout
        providers = list(self._providers)
        result: list[bool] = []

        def run() -> None:
            ok = True
            for provider in providers:
                left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                ok = provider.force_flush(left_ms) is not False and ok
                if action == "shutdown":
                    provider.shutdown()
            result.append(ok)

        thread = threading.Thread(target=run, name=f"otel-{action}", daemon=True)
        thread.start()
        thread.join(timeout)
        _collector_healthy = bool(result and result[0]) and not thread.is_alive()
        return _collector_healthy

    def __enter__(self) -> Telemetry:
        global _otel_logger, _active
        if self.logger is not None:
            _otel_logger = self.logger
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


_process: Telemetry | None = None
_active: Telemetry | None = None


def active_telemetry() -> Telemetry | None:
    """The Telemetry this process has entered, if any (the parent's, during a run)."""
    return _active


def process_telemetry(role: str, task_index: int | None = None) -> Telemetry:
    """This process's telemetry, opened on first use and shut down at exit (bounded)."""
    global _process
    if _process is None:
        _process = Telemetry(role, task_index).__enter__()
        from downloader.worker import at_exit  # only workers have a process telemetry

        at_exit(_process.shutdown)
    return _process
