"""Which async S3 client for the object-store output: CPU per PUT and installed weight.

    .venv/bin/python bench/s3_clients.py [--objects 2000] [--size 20000] [--concurrency 64]

Starts moto's S3 server (``moto_server``, a dev dependency) on 127.0.0.1, then
runs each client in a process of its own: ``--objects`` PUTs of ``--size``
random bytes, ``--concurrency`` at once, on one event loop. Per client it
prints the import time, the wall time, the client process's CPU (user + system
of all its threads, ``RUSAGE_SELF``: obstore's Rust runtime threads count) per
PUT, and its peak RSS. moto is slow (Python, one thread per request): the wall
time is mostly the server's, so compare the CPU column, which is the client's
own. Last, the installed size of each client with everything it pulls in that
imgdl does not install anyway (from the installed distributions' RECORD files).

aiobotocore is not a dependency of imgdl: ``pip install aiobotocore`` into the
venv to measure it; a client that is missing is reported as such.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

BUCKET = "imgdl-bench"
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ALLOW_HTTP": "true",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _put_obstore(endpoint: str, bodies: list[bytes], concurrency: int) -> None:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, client_options={"allow_http": True})
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, body: bytes) -> None:
        async with gate:
            await obstore.put_async(
                store, f"obstore/{i:06d}.jpg", body, attributes={"Content-Type": "image/jpeg"}
            )

    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


async def _put_aiobotocore(endpoint: str, bodies: list[bytes], concurrency: int) -> None:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(max_pool_connections=concurrency)
    async with get_session().create_client("s3", endpoint_url=endpoint, config=config) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, body: bytes) -> None:
            async with gate:
                await client.put_object(
                    Bucket=BUCKET,
                    Key=f"aiobotocore/{i:06d}.jpg",
                    Body=body,
                    ContentType="image/jpeg",
                )

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


CLIENTS = {"obstore": _put_obstore, "aiobotocore": _put_aiobotocore}
MODULES = {"obstore": "obstore", "aiobotocore": "aiobotocore.session"}


def run_client(name: str, endpoint: str, objects: int, size: int, concurrency: int) -> None:
    """In the child: import, PUT, print one JSON line of measurements."""
    started = time.perf_counter()
    try:
        __import__(MODULES[name])
    except ImportError as exc:
        print(json.dumps({"client": name, "missing": str(exc)}))
        return
    imported = time.perf_counter() - started
    bodies = [os.urandom(size) for _ in range(objects)]
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    asyncio.run(CLIENTS[name](endpoint, bodies, concurrency))
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        json.dumps(
            {
                "client": name,
                "import_s": round(imported, 3),
                "wall_s": round(wall, 2),
                "puts_per_s": round(objects / wall, 1),
                "cpu_s": round(cpu, 2),
                "cpu_ms_per_put": round(1000 * cpu / objects, 3),
                "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
            }
        )
    )


def _requirement_names(dist: str) -> set[str]:
    """The distributions ``dist`` needs, transitively (extras and markers left out)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _installed_bytes(dist: str) -> int:
    total = 0
    for file in metadata.distribution(dist).files or []:
        path = Path(str(file.locate()))
        if path.is_file():
            total += path.stat().st_size
    return total


def weight(client: str) -> dict[str, object]:
    """Bytes on disk of ``client`` and what it pulls in beyond imgdl's own dependencies."""
    try:
        metadata.distribution(client)
    except metadata.PackageNotFoundError:
        return {"client": client, "missing": True}
    ours = _requirement_names("imgdl") - {"imgdl"}
    extra = sorted(_requirement_names(client) - ours)
    return {
        "client": client,
        "adds": extra,
        "adds_mib": round(sum(_installed_bytes(d) for d in extra) / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_client(args.child, args.endpoint, args.objects, args.size, args.concurrency)
        return 0
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **ENV}
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(
                    urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=2
                )
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("moto_server did not start") from None
                time.sleep(0.2)
        for client in CLIENTS:
            child = subprocess.run(
                [
                    *(sys.executable, __file__, "--child", client, "--endpoint", endpoint),
                    *("--objects", str(args.objects), "--size", str(args.size)),
                    *("--concurrency", str(args.concurrency)),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                check=False,
            )
            print(child.stdout.strip() or child.stderr.strip()[-2000:])
        for client in CLIENTS:
            print(json.dumps(weight(client)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
