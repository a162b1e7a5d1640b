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

from downloader.httpclient import ResponseLike
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

    async def _raw(self) -> AsyncIterator[bytes]:
        window_start, window_bytes = time.monotonic(), 0
        async for chunk in self.resp.content.iter_chunked(CHUNK_BYTES):
            self.raw_bytes += len(chunk)
            window_bytes += len(chunk)
            if time.monotonic() - window_start >= self.window:
                if window_bytes < self.min_window_bytes:
                    raise BodyError(
                        Reason.TIMEOUT,
                        f"body arrives too slowly ({window_bytes} bytes in {self.window:g} s; "
                        f"http.min_speed is {self.min_window_bytes / self.window:g} bytes/s)",
                    )
                window_start, window_bytes = time.monotonic(), 0
            yield chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        inflater = self.inflater
        if inflater is None:
            async for chunk in self._raw():
                yield chunk
            return
        try:
            async for chunk in self._raw():
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
