"""Memory of a duplicate-heavy run: N lines over D distinct URLs (default 1,000,000 / 10,000).

    .venv/bin/python bench/dedupe_rss.py OUTDIR [N] [D]

Samples the resident memory of the imgdl parent and of the whole process tree
every 0.2 s and prints the peaks. The duplicates never reach a worker: they are
answered in the parent from the on-disk set of URLs seen (dedupe.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer
from downloader.proctree import descendants, rss_kib

ENV = {**os.environ, **ALLOW_LOOPBACK}


def main() -> int:
    out = Path(sys.argv[1])
    lines = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    distinct = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    listing = out.with_name(out.name + "-urls.txt")
    with DevServer() as server:
        with open(listing, "w") as handle:
            for i in range(lines):
                handle.write(f"{server.url}/i/{(i * 7919) % distinct}.jpg\n")
        started = time.monotonic()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "downloader",
                "fetch",
                str(listing),
                "-o",
                str(out),
                "--log-level",
                "warning",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        parent_peak = tree_peak = 0
        while proc.poll() is None:
            parent_peak = max(parent_peak, rss_kib(proc.pid))
            tree_peak = max(tree_peak, sum(rss_kib(p) for p in descendants(proc.pid)))
            time.sleep(0.2)
        wall = time.monotonic() - started
        requests = len(server.requests)
    stderr = proc.stderr.read() if proc.stderr else ""
    summary = json.loads((out / "summary.json").read_text())
    print(stderr.strip())
    print(f"lines {lines}, distinct URLs {distinct}, requests {requests}, wall {wall:.1f} s")
    print(f"duplicates {summary['by_reason'].get('duplicate', 0)}")
    print(f"peak RSS: parent {parent_peak / 1024:.0f} MiB, process tree {tree_peak / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
