"""The errors of one request that carry their outcome reason.

Raised by the builtin HTTP client (``httpclient.py``) and by the network policy's
DNS check (``netpolicy.TargetCheck``); ``fetch.classify`` records ``reason`` as it
is. Kept apart from both so that neither imports the other for its errors.
"""

from __future__ import annotations

from typing import ClassVar

from downloader.outcomes import Reason


class HttpClientError(Exception):
    """A request that failed; ``reason`` is the outcome the manifest records."""

    reason: ClassVar[Reason] = Reason.PROTOCOL_ERROR


class ConnectError(HttpClientError):
    """No connection: the name does not resolve, or no address accepts."""

    reason = Reason.CONNECTION_ERROR


class TlsError(HttpClientError):
    reason = Reason.TLS_ERROR


class ProtocolError(HttpClientError):
    """The server's bytes are not a well-formed HTTP/1.1 answer."""

    reason = Reason.PROTOCOL_ERROR


class HeadLost(ProtocolError):
    """The connection ended after the request, before the answer's head was whole: the
    server spoke (or took the request), then hung up."""

    def __init__(self, detail: str | None = None) -> None:
        why = f": {detail}" if detail else ""
        super().__init__(f"connection lost before a complete response head{why}")


class TruncatedError(HttpClientError):
    """The connection ended before the body did."""

    reason = Reason.TRUNCATED
