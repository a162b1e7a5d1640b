"""What a download costs without aiohttp: the evidence behind issue 5's analysis.

    .venv/bin/python bench/lean_http_probe.py URLS.txt OUTDIR [PROCESSES] [IN_FLIGHT]

Not imgdl: a probe. Plain http:// only, keep-alive connections over an asyncio
protocol with the ``httptools`` (llhttp) parser under uvloop, sha256 of each body,
written to a part file and renamed into place; no retries, no checks, no records.
It prints images/s and CPU s per 1,000 images of its processes, to set beside the
``naive-aiohttp`` row of ``compare.py`` (use the list compare.py leaves in
/dev/shm/imgdl-bench/urls.txt while its nginx runs, or any nginx on loopback).
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httptools  # type: ignore[import-not-found]
import uvloop


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.done: asyncio.Future[None] | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection lost"))

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, chunk: bytes) -> None:
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(None)

    async def get(self, host: str, path: str) -> tuple[int, bytes]:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n\r\n".encode()
        )
        await self.done
        return self.parser.get_status_code(), b"".join(self.body)


async def download(urls: list[str], out: Path, in_flight: int) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)

    async def consumer() -> None:
        connection: Connection | None = None
        while not queue.empty():
            url = queue.get_nowait()
            parts = urlsplit(url)
            if (
                connection is None
                or connection.transport is None
                or connection.transport.is_closing()
            ):
                _, connection = await loop.create_connection(Connection, parts.hostname, parts.port)
            status, body = await connection.get(parts.netloc, parts.path)
            if status != 200:
                continue
            digest = hashlib.sha256(body).hexdigest()
            final = out / url.rsplit("/", 1)[-1]
            part = out / f".{digest}.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, body)
            os.close(fd)
            os.rename(part, final)

    await asyncio.gather(*(consumer() for _ in range(in_flight)))


def process(urls: list[str], out: Path, in_flight: int) -> None:
    uvloop.run(download(urls, out, in_flight))


def main() -> None:
    urls = Path(sys.argv[1]).read_text().split()
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    processes = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    in_flight = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    started = time.monotonic()
    workers = [
        multiprocessing.Process(target=process, args=(urls[i::processes], out, in_flight))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.monotonic() - started
    saved = sum(1 for _ in out.iterdir())
    if any(worker.exitcode != 0 for worker in workers) or saved < len(urls):
        sys.exit(f"failed: {saved} of {len(urls)} files in {out}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    per_1000 = cpu / len(urls) * 1000
    print(f"{len(urls) / wall:,.0f} images/s, {per_1000:.3f} CPU s per 1,000, {wall:.2f} s")


if __name__ == "__main__":
    main()
