"""Do the rate limits hold across processes? Measured at the servers.

    .venv/bin/python bench/limits_check.py

1. ``--processes 2 --rate 20`` over 200 URLs: the busiest 2-second window at the
   server (at most 40 would be exact) and the wall time against the ideal 10 s.
2. Three hosts (127.0.0.1/.2/.3) at 10, 5 and 20 requests/s at once
   (``limits.per_host_rate`` and ``limits.hosts``), 8 s of work each.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer, busiest_window

ENV = {**os.environ, **ALLOW_LOOPBACK}


def run(args: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "downloader", "fetch", *args, "--log-level", "warning"],
        check=True,
        capture_output=True,
        env=ENV,
    )
    return time.monotonic() - started


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    with DevServer() as server:
        listing = tmp / "g.txt"
        listing.write_text("".join(f"{server.url}/i/{n}.jpg\n" for n in range(200)))
        wall = run(
            [
                str(listing),
                "-o",
                str(tmp / "g"),
                "--processes",
                "2",
                "--rate",
                "20",
                "--shard-size",
                "50",
            ]
        )
        times = [t for t, _, _ in server.requests]
        span = max(times) - min(times)
        print(
            f"global --rate 20, 2 processes, 200 URLs: busiest 2 s window {busiest_window(times)} "
            f"(limit 44), first-to-last request {span:.2f} s, wall {wall:.2f} s "
            f"(ideal 10 s, ratio {wall / 10:.2f})"
        )
    servers = [DevServer(host=f"127.0.0.{i}").start() for i in (1, 2, 3)]
    try:
        a, b, c = servers
        urls = []
        for n in range(40):
            urls.append(f"{b.url}/i/{n}.jpg")
            urls += [f"{a.url}/i/{2 * n + k}.jpg" for k in range(2)]
            urls += [f"{c.url}/i/{4 * n + k}.jpg" for k in range(4)]
        listing = tmp / "h.txt"
        listing.write_text("\n".join(urls) + "\n")
        config = tmp / "h.yaml"
        config.write_text(
            "limits:\n  per_host_rate: 10\n  hosts:\n"
            "    127.0.0.2: {rate: 5}\n    127.0.0.3: {rate: 20}\n"
        )
        wall = run(
            [
                str(listing),
                "-o",
                str(tmp / "h"),
                "--processes",
                "2",
                "--shard-size",
                "40",
                "--config",
                str(config),
            ]
        )
        for srv, rate in ((a, 10), (b, 5), (c, 20)):
            times = [t for t, _, _ in srv.requests]
            print(
                f"host {srv.host} at {rate}/s: {len(times)} requests, busiest 2 s window "
                f"{busiest_window(times)} (limit {2 * rate})"
            )
        print(f"per-host run wall {wall:.2f} s (ideal 8 s, ratio {wall / 8:.2f})")
    finally:
        for srv in servers:
            srv.stop()


if __name__ == "__main__":
    main()
