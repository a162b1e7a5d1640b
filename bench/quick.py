"""A quick loopback run: N URLs (10 % failing on purpose) from the dev server, one imgdl run.

    .venv/bin/python bench/quick.py OUTDIR [N] [-- extra imgdl flags]

Prints wall time, the run's own summary and a check that the manifest holds
exactly one record per line. Put OUTDIR on a tmpfs (/dev/shm/...) to measure the
downloader rather than the disk. The server runs in this process, on one core.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer

ENV = {**os.environ, **ALLOW_LOOPBACK}


def main() -> int:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    out = Path(args[0])
    count = int(args[1]) if len(args) > 1 else 10_000
    shutil.rmtree(out, ignore_errors=True)
    rng = random.Random(1)
    with DevServer() as server:
        urls = []
        for i in range(count):
            roll = rng.random()
            if roll < 0.05:
                urls.append(f"{server.url}/status/404/{i}")
            elif roll < 0.08:
                urls.append(f"{server.url}/html/{i}")
            elif roll < 0.10:
                urls.append(f"{server.url}/truncated/{i}")
            else:
                urls.append(f"{server.url}/i/{i}.jpg")
        listing = out.with_name(out.name + "-urls.txt")
        listing.write_text("\n".join(urls) + "\n")
        started = time.monotonic()
        command = [
            sys.executable,
            "-m",
            "downloader",
            "fetch",
            str(listing),
            "-o",
            str(out),
            "--log-level",
            "warning",
            *extra,
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=ENV)
        wall = time.monotonic() - started
    print(result.stderr.strip())
    with open(out / "manifest.jsonl") as handle:
        lines = {json.loads(line)["line"] for line in handle}
    print(f"wall {wall:.2f} s, exit {result.returncode}, manifest lines {len(lines)} of {count}")
    return 0 if len(lines) == count else 1


if __name__ == "__main__":
    sys.exit(main())
