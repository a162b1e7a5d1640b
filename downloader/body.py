"""Reading a response body: a speed floor, and decompression that cannot explode.

imgdl asks for ``Accept-Encoding: identity``; a server that compresses anyway
gets its gzip or deflate body inflated here, at most ``CHUNK_BYTES`` of output
per step, so a small body that inflates to gigabytes costs one chunk of memory
and ends at the size cap like any other large image.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from downloader.httpclient import Response, ResponseLike
from downloader.outcomes import Reason

CHUNK_BYTES = 64 * 1024
_GZIP_OR_ZLIB = zlib.MAX_WBITS | 32  # zlib detects either header


class BodyError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Body:
    """The decoded chunks of one response; ``raw_bytes`` counts what came off the wire."""

    def __init__(self, resp: ResponseLike, window: float, min_speed: float) -> None:
        self.resp = resp
        self.window = window
        self.min_window_bytes = min_speed * window
        self.raw_bytes = 0
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise BodyError(Reason.PROTOCOL_ERROR, f"unsupported Content-Encoding {encoding!r}")
        self.inflater = (
            zlib.decompressobj(_GZIP_OR_ZLIB) if encoding not in ("", "identity") else None
        )

    def arrived(self, at_most: int) -> list[bytes] | None:
        """The chunks of an identity body of at most ``at_most`` bytes that the client
        has all of already (``Response.arrived``), else None: read it with ``chunks``.
        Iterating such a body asynchronously, chunk by chunk under the speed floor, was
        about 5 % of a worker's CPU instructions (issue 5)."""
        if self.inflater is not None or not isinstance(self.resp, Response):
            return None
        chunks = self.resp.arrived(at_most)
        if chunks is not None:
            self.raw_bytes = sum(map(len, chunks))
        return chunks

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's decoded chunks. An identity body (nearly every image) is read
        through :class:`_Raw`, a plain iterator object: two async generators in a
        row cost a frame each per chunk and a registration with the event loop per
        body, a few percent of a worker's CPU (issue 5)."""
        if self.inflater is None:
            return _Raw(self)
        return self._inflated(self.inflater)

    async def _inflated(self, inflater: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in _Raw(self):
                data = chunk
                while data:
                    out = inflater.decompress(data, CHUNK_BYTES)
                    if out:
                        yield out
                    data = inflater.unconsumed_tail
            while not inflater.eof:
                out = inflater.decompress(inflater.unconsumed_tail, CHUNK_BYTES)
                if not out:
                    break
                yield out
        except zlib.error as exc:
            raise BodyError(Reason.PROTOCOL_ERROR, f"corrupt compressed body: {exc}") from None


class _Raw:
    """The chunks as they come off the wire, counted, under the speed floor."""

    __slots__ = ("_body", "_chunks", "_window_bytes", "_window_start")

    def __init__(self, body: Body) -> None:
        self._body = body
        self._chunks = body.resp.content.iter_chunked(CHUNK_BYTES).__aiter__()
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def __aiter__(self) -> _Raw:
        return self

    async def __anext__(self) -> bytes:
        chunk: bytes = await self._chunks.__anext__()
        body = self._body
        body.raw_bytes += len(chunk)
        self._window_bytes += len(chunk)
        if time.monotonic() - self._window_start >= body.window:
            if self._window_bytes < body.min_window_bytes:
                raise BodyError(
                    Reason.TIMEOUT,
                    f"body arrives too slowly ({self._window_bytes} bytes in "
                    f"{body.window:g} s; http.min_speed is "
                    f"{body.min_window_bytes / body.window:g} bytes/s)",
                )
            self._window_start, self._window_bytes = time.monotonic(), 0
        return chunk
