"""CPU per image of a worker's own path after the HTTP exchange (issue 5).

    .venv/bin/python bench/worker_path.py [N] [ROUNDS] [IMAGES_DIR]

For N URLs in one process, with no network: the name (``Store.stem_for``), the
existing-file probe, ``Fetcher._respond`` on a fake response that hands over real
image bytes (status and header checks, the body loop: sniff, sha256, size cap,
width/height; the part file, its commit, the outcome) and ``Journal.write``; a new
``Store`` every 1,000 URLs, as each shard makes one. Output in a fresh folder on
/dev/shm, the default name template (4,096 folders). Prints the process's CPU
microseconds per image for each round and their median: what the worker spends
besides HTTP and the event loop. Images: ``IMAGES_DIR`` (default: the corpus of
``compare.py``, /dev/shm/imgdl-bench/corpus/img), else generated 20 KB JPEG-like
bodies. ``SRC=/path/to/a/checkout`` runs that copy of the code instead of the
installed one (to compare two versions on the same machine, interleaved).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("SRC"):  # before any import of downloader: another copy of the code
    sys.meta_path = [f for f in sys.meta_path if "editable" not in str(f)]
    sys.path.insert(0, os.environ["SRC"])

import asyncio
import inspect
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

import downloader
from downloader.fetch import Fetcher, _Try
from downloader.outcomes import Job, Outcome
from downloader.settings import Settings
from downloader.shardrun import Journal
from downloader.storage import Store

SHARD = 1000


def _bodies(folder: Path) -> list[bytes]:
    if folder.is_dir():
        names = sorted(os.listdir(folder))[:2000]
        if names:
            return [(folder / n).read_bytes() for n in names]
    rest = bytes(range(256)) * 80
    return [b"\xff\xd8\xff\xe0" + i.to_bytes(4, "big") + rest for i in range(2000)]


class _Chunks:
    def __init__(self, body: bytes, size: int) -> None:
        self.body, self.size, self.at = body, size, 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.at >= len(self.body):
            raise StopAsyncIteration
        chunk = self.body[self.at : self.at + self.size]
        self.at += self.size
        return chunk


class _Content:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def iter_chunked(self, size: int) -> _Chunks:
        return _Chunks(self.body, size)


class _Response:
    """What fetch.py and body.py read of a response."""

    status = 200
    reason = "OK"

    def __init__(self, body: bytes) -> None:
        self.content = _Content(body)
        self.content_length = len(body)
        headers = {
            "Content-Length": str(len(body)),
            "Content-Type": "image/jpeg",
            "ETag": '"5f1e-abc"',
            "Last-Modified": "Mon, 01 Jan 2024 00:00:00 GMT",
        }
        self.headers = CIMultiDictProxy(CIMultiDict(headers))


async def _round(n: int, out: Path, bodies: list[bytes]) -> float:
    settings = Settings()
    shared = "checked_dirs" in inspect.signature(Store).parameters  # older versions: no
    checked: set[str] = set()

    def new_store() -> Store:
        extra: dict[str, Any] = {"checked_dirs": checked} if shared else {}
        return Store(out, settings.output.name_template, probe=False, **extra)

    # older versions took an aiohttp session first
    old = "session" in inspect.signature(Fetcher).parameters
    fetcher = Fetcher(*([None] if old else []), new_store(), settings)  # type: ignore[arg-type]
    journal = Journal(out / "journal.jsonl")
    jobs = [Job(url=f"http://127.0.0.1:1/img/{i:06d}.jpg", input="u.txt", line=i) for i in range(n)]
    responses = [_Response(bodies[i % len(bodies)]) for i in range(n)]
    outcome: Outcome | None = None
    started = time.process_time()
    for i, (job, resp) in enumerate(zip(jobs, responses, strict=True)):
        if i % SHARD == 0:
            fetcher.store = new_store()
        stem = fetcher.store.stem_for(job)
        fetcher.store.existing(stem)
        outcome = await fetcher._respond(job, stem, resp, _Try(1, time.monotonic()))  # type: ignore[arg-type]
        journal.write(outcome)
    spent = time.process_time() - started
    journal.close()
    assert outcome is not None and outcome.status == "saved", outcome
    return spent / n * 1e6


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    bodies = _bodies(Path(sys.argv[3] if len(sys.argv) > 3 else "/dev/shm/imgdl-bench/corpus/img"))
    results = []
    for _ in range(rounds):
        out = Path(f"/dev/shm/worker-path-{os.getpid()}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        try:
            results.append(asyncio.run(_round(n, out, bodies)))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    code = Path(downloader.__file__).parent.parent
    shown = " ".join(f"{r:.1f}" for r in sorted(results))
    print(f"{code}: {shown} us/img, median {statistics.median(results):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
