"""A real S3 server for the tests: moto in server mode, behind a proxy that counts and fails.

moto (``python -m moto.server``) runs as a process of its own on 127.0.0.2, so its
CPU does not compete with the test's dev server for one GIL, and an address the
network policy of the tests does not allow (127.0.0.1/32 only) shows that the
policy does not apply to the store's own client. moto has no fault injection:
:class:`S3Proxy` forwards every request to it, records ``(method, path, query)``,
and answers 503 (with S3's XML error) to the requests its ``fail`` predicate
picks, the way a store under load does.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from downloader.devserver import BackgroundApp

HOST = "127.0.0.2"
#: Headers that belong to one hop, not to the request or response forwarded.
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port(host: str = HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on HOST and a free port, stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoServer:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def client(self) -> Any:
        """A boto3 S3 client straight to this server (not through imgdl), as the tests'
        and benchmarks' own view of the bucket."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=CREDENTIALS["AWS_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class S3Proxy(BackgroundApp):
    """Forwards to ``upstream``; records each request; fails those ``fail`` picks."""

    host = HOST

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str, str]] = []
        self.fail: Callable[[str, str], bool] = lambda method, path: False
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        return app

    def puts(self, under: str = "") -> list[str]:
        """Paths of the PUT requests (uploads and parts) seen so far, below ``under``."""
        return [p for m, p, _ in self.requests if m == "PUT" and p.startswith(under)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.query_string))
        body = await request.read()
        if self.fail(request.method, request.path):
            self.failed += 1
            return web.Response(
                status=503,
                content_type="application/xml",
                text="<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                "<Message>Please reduce your request rate.</Message></Error>",
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            return web.Response(status=upstream.status, headers=out, body=payload)

    def _before_stop(self, loop: object) -> None:
        if self._session is not None:
            import asyncio

            assert isinstance(loop, asyncio.AbstractEventLoop)
            asyncio.run_coroutine_threadsafe(self._session.close(), loop).result(10)
