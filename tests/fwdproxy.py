"""A real forward proxy on 127.0.0.1 for the tests, which records every request.

It speaks what curl and aiohttp send to an HTTP proxy: absolute-URI requests
(``GET http://host:port/path HTTP/1.1``), forwarded upstream over a new TCP
connection with ``Connection: close``, and ``CONNECT host:port``, answered by a
tunnel. Each request is recorded (method, target, Proxy-Authorization) before
anything is forwarded, so a request the proxy refuses or cannot forward is still
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from types import TracebackType
from typing import Self


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    target: str
    proxy_authorization: str | None


class LoopServer:
    """A TCP server on 127.0.0.1 on an event loop of its own thread, for ``with``:
    subclasses answer each connection in ``_handle`` (closed after it, whatever it
    raised of the connection errors)."""

    def __init__(self) -> None:
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"the test server {type(self).__name__} did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stop = self._stop
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ForwardProxy(LoopServer):
    """``with ForwardProxy() as proxy:`` ... ``proxy.url``, ``proxy.seen``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await self._forward(head, reader, writer)

    async def _forward(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ", 2)
        headers = [line for line in lines if line]
        auth = next(
            (h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-auth")),
            None,
        )
        self.seen.append(Seen(method, target, auth))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await pipe_both(reader, writer, up_reader, up_writer)
            return
        scheme, _, rest = target.partition("://")
        if scheme != "http":
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        authority, _, path = rest.partition("/")
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "80")
        kept = [
            h for h in headers if not h.lower().startswith(("proxy-", "connection:", "keep-alive:"))
        ]
        upstream = f"{method} /{path} {version}\r\n" + "".join(
            f"{h}\r\n" for h in [*kept, "Connection: close"]
        )
        up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        up_writer.write(upstream.encode("latin-1") + b"\r\n")
        await up_writer.drain()
        await pipe_both(reader, writer, up_reader, up_writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    """Bytes both ways until the upstream side ends (it closes after one response)."""
    to_up = asyncio.ensure_future(_pipe(reader, up_writer))
    await _pipe(up_reader, writer)
    to_up.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await to_up
