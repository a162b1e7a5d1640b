"""CPU instructions per image of a worker's download loop, counted by cachegrind (issue 5).

    .venv/bin/python bench/worker_instructions.py URLS [LOW HIGH]

Runs the worker's loop in one process (``HttpClient`` + ``Fetcher.fetch`` +
``Journal.write``, 64 downloads at a time, uvloop, the default settings; output in
a fresh folder on /dev/shm) under ``valgrind --tool=cachegrind`` twice, over the
first LOW and the first HIGH URLs of the list (default 300 and 1,300), and prints
the difference per image: the user-space instructions one more download costs,
start-up and imports cancelled out. The URLs must be served on loopback (the
corpus of ``compare.py``: ``nginx.py`` serves it).

Why instructions and not seconds: on the project's shared 2-core VMs a process's
CPU time per image moves 10-20 % between runs of the same code, so a change worth
2 % needs dozens of interleaved runs to show; the instruction count of the same
code moves by about 1,000 in 900,000. It leaves out the kernel (the socket and
file system calls) and cache misses, so it ranks changes of the Python path, it
does not replace ``compare.py``. Under valgrind, OpenSSL's sha256 runs without
the CPU's SHA instructions: about 565,000 of each image's count is the hash of a
20 KB body, where the real CPU spends about 10 us.

``SRC=/path/to/a/checkout`` counts that copy of the code instead (to compare two
versions); ``--inner N`` is the loop itself, what valgrind runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

if os.environ.get("SRC"):  # before any import of downloader: another copy of the code
    sys.meta_path = [f for f in sys.meta_path if "editable" not in str(f)]
    sys.path.insert(0, os.environ["SRC"])

OUT = "/dev/shm/imgdl-worker-instructions"


def inner(listing: str, count: int) -> None:
    import asyncio
    import shutil
    from pathlib import Path

    import uvloop

    from downloader.fetch import Fetcher
    from downloader.httpclient import HttpClient
    from downloader.netpolicy import NetworkPolicy
    from downloader.outcomes import Job
    from downloader.settings import Settings
    from downloader.shardrun import Journal
    from downloader.storage import Store

    out = Path(OUT)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with open(listing, encoding="utf-8") as handle:
        urls = handle.read().split()[:count]

    async def run() -> None:
        settings = Settings.model_validate({"network": {"allow": ["127.0.0.0/8"]}})
        policy = NetworkPolicy.from_strings(["127.0.0.0/8"])
        fetcher = Fetcher(
            Store(out, settings.output.name_template, probe=False),
            settings,
            None,
            policy,
            client=HttpClient(settings, policy),
        )
        journal = Journal(out / "journal.jsonl")
        jobs = [Job(url=url, input="urls", line=n) for n, url in enumerate(urls, 1)]

        async def consume() -> None:
            while jobs:
                journal.write(await fetcher.fetch(jobs.pop()))

        await asyncio.gather(*(consume() for _ in range(64)))

    uvloop.run(run())
    saved = (out / "journal.jsonl").read_text(encoding="utf-8").count('"status":"saved"')
    if saved != len(urls):
        sys.exit(f"only {saved} of {len(urls)} images saved: is the server up?")
    shutil.rmtree(out, ignore_errors=True)


def counted(listing: str, count: int) -> int:
    done = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            __file__,
            listing,
            "--inner",
            str(count),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    if done.returncode != 0:
        sys.exit(done.stderr[-2000:])
    refs = [line for line in done.stderr.splitlines() if "I   refs:" in line]
    return int(refs[-1].rsplit(":", 1)[1].replace(",", ""))


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 3 and args[1] == "--inner":
        inner(args[0], int(args[2]))
        return
    if len(args) not in (1, 3):
        sys.exit(__doc__)
    low, high = (int(args[1]), int(args[2])) if len(args) == 3 else (300, 1300)
    a, b = counted(args[0], low), counted(args[0], high)
    print(f"{(b - a) / (high - low):,.0f} instructions per image ({low:,}: {a:,}; {high:,}: {b:,})")


if __name__ == "__main__":
    main()
