"""The fallback server when nginx cannot be had: aiohttp serving a folder, N processes.

    python bench/static_server.py ROOT PORT [PROCESSES]

Same routes as bench/nginx.py: files under ROOT, ``/t/<anything>`` a tiny PNG,
``/404/<anything>`` a fast 404. Slower than nginx: the benchmark says which ran.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

from aiohttp import web


def serve(root: Path, port: int) -> None:
    tiny = (root / "tiny.png").read_bytes()

    async def tiny_png(request: web.Request) -> web.Response:
        return web.Response(body=tiny, content_type="image/png")

    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/t/{rest:.*}", tiny_png)
    app.router.add_get("/404/{rest:.*}", not_found)
    app.router.add_static("/", root)
    web.run_app(app, host="127.0.0.1", port=port, reuse_port=True, access_log=None, print=None)


if __name__ == "__main__":
    folder, port = Path(sys.argv[1]), int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    workers = [multiprocessing.Process(target=serve, args=(folder, port)) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
