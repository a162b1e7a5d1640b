"""Logs for every process: structlog on stderr, mirrored to OpenTelemetry.

Each process (the parent, and each shard a worker runs) opens a
:class:`TelemetryScope` and closes it in ``finally``. Closing force-flushes and
shuts the providers down itself, within a time bound, instead of trusting atexit:
a pool worker that is terminated or killed runs no exit hook, and under the
``fork`` start method workers leave through ``os._exit`` (opentelemetry-python
#4005). The bound matters because ``shutdown`` can hang on an unreachable
collector (#2284); after one flush has timed out, later ones in the same process
get a short bound, so a dead collector costs a shard well under a second.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import Logger as OtelLogger
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from downloader import __version__

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
_SEVERITY = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
    "critical": SeverityNumber.FATAL,
}
_otel_logger: OtelLogger | None = None
_collector_healthy = True


def otlp_logs_wanted(env: Mapping[str, str] = os.environ) -> bool:
    """OTLP export happens only when the standard variables ask for it."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_LOGS_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
    )


def _to_otel(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: copy the record to the OpenTelemetry logger, if one is open."""
    logger = _otel_logger
    if logger is not None:
        attributes = {
            k: v if isinstance(v, str | bool | int | float) else str(v)
            for k, v in event.items()
            if k not in ("event", "level", "timestamp")
        }
        logger.emit(
            timestamp=time.time_ns(),
            severity_number=_SEVERITY.get(method, SeverityNumber.INFO),
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


def get_logger(**context: Any) -> Any:
    """A logger; without context it stays lazy, so it may be created before configuration."""
    logger = structlog.get_logger("imgdl")
    return logger.bind(**context) if context else logger


class TelemetryScope:
    """OpenTelemetry providers for one unit of work (a shard, or the parent's run)."""

    def __init__(self, role: str, **attributes: str | int) -> None:
        self._provider: LoggerProvider | None = None
        if not otlp_logs_wanted():
            return
        # Imported lazily: the exporter pulls in requests and protobuf.
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME", "imgdl"),
                "service.version": __version__,
                "process.pid": os.getpid(),
                "imgdl.role": role,
                **{f"imgdl.{k}": v for k, v in attributes.items()},
            }
        )
        self._provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        self._provider.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter()))

    def __enter__(self) -> TelemetryScope:
        global _otel_logger
        if self._provider is not None:
            _otel_logger = self._provider.get_logger("imgdl", __version__)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> bool:
        """Flush and shut down within ``timeout`` seconds; True if everything was sent."""
        global _otel_logger, _collector_healthy
        _otel_logger = None
        if timeout is None:
            timeout = FLUSH_SECONDS if _collector_healthy else FLUSH_SECONDS_UNHEALTHY
        provider, self._provider = self._provider, None
        if provider is None:
            return True
        result: list[bool] = []

        def flush_and_shutdown() -> None:
            result.append(provider.force_flush(int(timeout * 1000)))
            provider.shutdown()

        thread = threading.Thread(target=flush_and_shutdown, name="otel-flush", daemon=True)
        thread.start()
        thread.join(timeout)
        _collector_healthy = bool(result and result[0]) and not thread.is_alive()
        return _collector_healthy
