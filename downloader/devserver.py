"""A loopback image server for the demo, the tests and the benchmarks.

It serves real image files and misbehaves on purpose on some paths, so a run
against it shows every kind of outcome without touching the internet::

    python -m downloader.devserver --images examples/images --port 8000

Routes (``N`` is any integer; it picks an image, so every URL is distinct):

    /i/N.jpg              an image (N modulo the number of files)
    /status/CODE/N        that HTTP status
    /slow/MS/N            an image after MS milliseconds
    /truncated/N          claims more bytes than it sends, then closes
    /html/N               an HTML page served as image/jpeg
    /block/N              waits until ``release()`` (tests), then an image
    /flaky/K/N            503 for the first K requests of this path, then an image
    /throttle/S/N         429 with ``Retry-After: S`` the first time, then an image
    /throttle-date/S/N    the same with Retry-After as an HTTP date S seconds ahead
    /drip/N               an image at one byte a second
    /reset/N              half an image, then a TCP reset
    /hang/N               accepts the request and never answers
    /tagged/N?tag=V       an image with an ``X-Robots-Tag: V`` header per ``tag``
    /redirect?to=URL      302 to URL
    /bomb/N               a gzip body (Content-Encoding: gzip) that inflates to 1 GiB
    /huge/N               1 GiB, streamed without Content-Length
    /declared-huge/N      says Content-Length: 1 GiB
    /body/NAME            the bytes and Content-Type given as ``bodies[NAME]``
    /etag/N               image N + ``etag_version`` with an ETag; 304 on If-None-Match
    /loop/N               302 to itself, forever
    /auth/bearer/N        an image with ``Authorization: Bearer <bearer_token>``, else 401
    /auth/basic/N         an image with basic credentials ``basic_auth``, else 401
    /cookie/N             an image with the cookie ``cookie`` (NAME=VALUE), else 403
    /_stats               JSON: requests seen so far
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import mimetypes
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Self

from aiohttp import web

DEFAULT_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
#: The environment that lets imgdl reach this server: loopback is refused by default.
ALLOW_LOOPBACK = {"IMGDL_NETWORK_ALLOW": "[127.0.0.0/8, '::1/128']"}


def busiest_window(times: list[float], width: float = 2.0) -> int:
    """The most requests inside any window of ``width`` seconds (from ``requests`` times)."""
    times = sorted(times)
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


class BackgroundApp:
    """An aiohttp application served on loopback from a thread of its own: the dev
    server, and the test doubles (an OTLP collector) that tests start beside it."""

    host = "127.0.0.1"
    port = 0
    ssl_context: ssl.SSLContext | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start_async(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def start(self) -> Self:
        """Start in a background thread; returns once the server accepts connections."""
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{type(self).__name__} did not start")
        return self

    def _before_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called in the caller's thread before the server shuts down."""

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop
        self._before_stop(loop)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DevServer(BackgroundApp):
    """The server, runnable in a background thread (tests) or in the foreground (demo)."""

    def __init__(
        self,
        images: Path = DEFAULT_IMAGES,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        bodies: dict[str, tuple[bytes, str]] | None = None,
    ):
        files = sorted(p for p in images.iterdir() if p.is_file()) if images.is_dir() else []
        if not files:
            raise SystemExit(f"no images in {images}; point --images at a folder of images")
        self.images = [
            (p.read_bytes(), mimetypes.guess_type(p.name)[0] or "image/jpeg") for p in files
        ]
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.bodies = bodies or {}
        self.requests: list[tuple[float, str, str]] = []  # (monotonic time, host header, path)
        self._release: asyncio.Event | None = None
        self.blocked = 0
        self.hits: dict[str, int] = {}
        self.user_agents: set[str] = set()
        self.inflight = 0
        self.etag_version = 0
        self._bomb_cache: bytes | None = None
        self.max_inflight = 0
        self.bearer_token = "dev-token"
        self.basic_auth = ("dev", "dev-password")
        self.cookie = "session=dev-cookie"
        #: (path, Authorization, Cookie, Referer) of every request, for the tests
        self.credentials_seen: list[tuple[str, str, str, str]] = []

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def image(self, n: int) -> tuple[bytes, str]:
        return self.images[n % len(self.images)]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/i/{n:\\d+}.{ext}", self._image)
        app.router.add_get("/status/{code:\\d+}/{n}", self._status)
        app.router.add_get("/slow/{ms:\\d+}/{n:\\d+}", self._slow)
        app.router.add_get("/truncated/{n:\\d+}", self._truncated)
        app.router.add_get("/html/{n}", self._html)
        app.router.add_get("/block/{n:\\d+}", self._block)
        app.router.add_get("/flaky/{k:\\d+}/{n:\\d+}", self._flaky)
        app.router.add_get("/throttle/{s:\\d+}/{n:\\d+}", self._throttle)
        app.router.add_get("/throttle-date/{s:\\d+}/{n:\\d+}", self._throttle)
        app.router.add_get("/drip/{n:\\d+}", self._drip)
        app.router.add_get("/reset/{n:\\d+}", self._reset)
        app.router.add_get("/hang/{n:\\d+}", self._hang)
        app.router.add_get("/tagged/{n:\\d+}", self._tagged)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/loop/{n:\\d+}", self._loop_redirect)
        app.router.add_get("/bomb/{n:\\d+}", self._bomb)
        app.router.add_get("/huge/{n:\\d+}", self._huge)
        app.router.add_get("/declared-huge/{n:\\d+}", self._declared_huge)
        app.router.add_get("/body/{name}", self._body)
        app.router.add_get("/etag/{n:\\d+}", self._etag)
        app.router.add_get("/auth/bearer/{n:\\d+}", self._bearer)
        app.router.add_get("/auth/basic/{n:\\d+}", self._basic)
        app.router.add_get("/cookie/{n:\\d+}", self._cookie)
        app.router.add_get("/_stats", self._stats)
        return app

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/_stats":
            return await handler(request)
        self.requests.append((time.monotonic(), request.host, request.path_qs))
        self.user_agents.add(request.headers.get("User-Agent", ""))
        self.credentials_seen.append(
            (
                request.path_qs,
                request.headers.get("Authorization", ""),
                request.headers.get("Cookie", ""),
                request.headers.get("Referer", ""),
            )
        )
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return await handler(request)
        finally:
            self.inflight -= 1

    async def _image(self, request: web.Request) -> web.Response:
        body, mime = self.image(int(request.match_info["n"]))
        return web.Response(body=body, content_type=mime)

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, text=f"status {code}\n")

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return await self._image(request)

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        body, mime = self.image(int(request.match_info["n"]))
        response = web.StreamResponse(
            headers={"Content-Type": mime, "Content-Length": str(len(body) * 2)}
        )
        await response.prepare(request)
        await response.write(body)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _html(self, request: web.Request) -> web.Response:
        page = b"<!doctype html><html><body><h1>Not found</h1></body></html>\n"
        return web.Response(body=page, headers={"Content-Type": "image/jpeg"})

    async def _block(self, request: web.Request) -> web.Response:
        assert self._release is not None
        self.blocked += 1
        try:
            await self._release.wait()
        finally:
            self.blocked -= 1
        return await self._image(request)

    def _seen(self, request: web.Request) -> int:
        """How many times this exact path was requested before (this one included)."""
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        return self.hits[request.path]

    async def _flaky(self, request: web.Request) -> web.Response:
        if self._seen(request) <= int(request.match_info["k"]):
            return web.Response(status=503, text="try again\n")
        return await self._image(request)

    async def _throttle(self, request: web.Request) -> web.Response:
        if self._seen(request) > 1:
            return await self._image(request)
        seconds = int(request.match_info["s"])
        value = str(seconds)
        if request.path.startswith("/throttle-date/"):
            value = email.utils.formatdate(time.time() + seconds, usegmt=True)
        return web.Response(status=429, text="slow down\n", headers={"Retry-After": value})

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        body, mime = self.image(int(request.match_info["n"]))
        response = web.StreamResponse(
            headers={"Content-Type": mime, "Content-Length": str(len(body))}
        )
        await response.prepare(request)
        for i in range(min(len(body), 600)):  # bounded: at most ten minutes
            await response.write(body[i : i + 1])
            await asyncio.sleep(1.0)
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        body, mime = self.image(int(request.match_info["n"]))
        response = web.StreamResponse(
            headers={"Content-Type": mime, "Content-Length": str(len(body))}
        )
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return response

    async def _hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(600)  # bounded, and cancelled when the client goes away
        return web.Response(status=504)

    async def _tagged(self, request: web.Request) -> web.Response:
        response = await self._image(request)
        for tag in request.query.getall("tag", []):
            response.headers.add("X-Robots-Tag", tag)
        return response

    async def _redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query.get("to", "/")})

    async def _bearer(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.bearer_token}":
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        return await self._image(request)

    async def _basic(self, request: web.Request) -> web.Response:
        pair = ":".join(self.basic_auth).encode()
        expected = "Basic " + base64.b64encode(pair).decode()
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="dev"'})
        return await self._image(request)

    async def _cookie(self, request: web.Request) -> web.Response:
        name, _, value = self.cookie.partition("=")
        if request.cookies.get(name) != value:
            return web.Response(status=403, text="no cookie")
        return await self._image(request)

    async def _loop_redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.path})

    _JPEG_HEAD = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(20)

    def _bomb_body(self) -> bytes:
        if self._bomb_cache is None:
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip wrapper
            parts = [packer.compress(self._JPEG_HEAD)]
            zeros = bytes(1 << 20)
            parts += [packer.compress(zeros) for _ in range(1024)]
            parts.append(packer.flush())
            self._bomb_cache = b"".join(parts)
        return self._bomb_cache

    async def _bomb(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._bomb_body)
        return web.Response(
            body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
        )

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(self._JPEG_HEAD)
        block = bytes(1 << 20)
        for _ in range(1024):  # bounded: 1 GiB, or until the client goes away
            await response.write(block)
        return response

    async def _declared_huge(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._JPEG_HEAD,
            headers={"Content-Type": "image/jpeg", "Content-Length": str(1 << 30)},
        )

    async def _etag(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        tag = f'"v{self.etag_version}-{n}"'
        if request.headers.get("If-None-Match") == tag:
            return web.Response(status=304, headers={"ETag": tag})
        body, mime = self.image(n + self.etag_version)
        return web.Response(body=body, headers={"Content-Type": mime, "ETag": tag})

    async def _body(self, request: web.Request) -> web.Response:
        found = self.bodies.get(request.match_info["name"])
        if found is None:
            return web.Response(status=404)
        body, mime = found
        return web.Response(body=body, headers={"Content-Type": mime})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": len(self.requests)})

    # -- lifecycle -------------------------------------------------------------

    async def start_async(self) -> None:
        self._release = asyncio.Event()
        await super().start_async()

    def release(self) -> None:
        """Let every request waiting on /block/N (now and later) go on."""
        assert self._loop is not None and self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    def _before_stop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._release is not None:
            loop.call_soon_threadsafe(self._release.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = DevServer(args.images, args.host, args.port)
    # a short shutdown: a client left waiting on /hang/N must not hold Ctrl-C or kill
    # for aiohttp's default 60 s
    web.run_app(server.app(), host=args.host, port=args.port, access_log=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
