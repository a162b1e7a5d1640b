"""Peak memory while refusing a 1 GiB gzip bomb and a 1 GiB endless body.

    .venv/bin/python bench/hostile_memory.py

Each case: 2 URLs, one imgdl run with validate.max_bytes at 1 GiB (so the whole
gigabyte streams through before the cap), sampling the resident memory of every
imgdl process every 50 ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer
from downloader.proctree import descendants, rss_kib

ENV = {
    **os.environ,
    **ALLOW_LOOPBACK,
    "IMGDL_VALIDATE_MAX_BYTES": str(1 << 30),
}


def main() -> None:
    with DevServer() as server:
        for route in ("bomb", "huge"):
            tmp = Path(tempfile.mkdtemp())
            listing = tmp / "u.txt"
            listing.write_text(f"{server.url}/{route}/1\n{server.url}/{route}/2\n")
            started = time.monotonic()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "downloader",
                    "fetch",
                    str(listing),
                    "-o",
                    str(tmp / "o"),
                    "--tries",
                    "1",
                    "--log-level",
                    "warning",
                ],
                stderr=subprocess.DEVNULL,
                env=ENV,
            )
            peak = 0
            while proc.poll() is None:
                peak = max([peak] + [rss_kib(p) for p in descendants(proc.pid)])
                time.sleep(0.05)
            wall = time.monotonic() - started
            reasons = [
                json.loads(line)["reason"]
                for line in (tmp / "o" / "manifest.jsonl").read_text().splitlines()
            ]
            print(
                f"{route}: {reasons}, wall {wall:.1f} s, peak RSS of one imgdl process "
                f"{peak / 1024:.0f} MiB"
            )


if __name__ == "__main__":
    main()
