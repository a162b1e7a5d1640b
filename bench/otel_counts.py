"""What one run exports over OTLP/HTTP, per process: log records, spans by name, metric points.

    .venv/bin/python bench/otel_counts.py [extra imgdl flags, e.g. --log-level debug]

Serves 2,000 images and 20 404s from the dev server, starts the test suite's
OTLP/HTTP receiver (tests/otlp_receiver.py, needs the dev extra) on 127.0.0.1,
runs ``imgdl fetch`` with two processes and shards of 250 against both, and
prints one row per (role, pid). The batch delays and the metric interval are set
to a minute, so everything counted was sent by imgdl's own flushes.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from downloader.devserver import DevServer
from tests.conftest import clean_env
from tests.otlp_receiver import OtlpReceiver


def main() -> int:
    with DevServer() as server, OtlpReceiver() as receiver, tempfile.TemporaryDirectory() as tmp:
        urls = Path(tmp) / "urls.txt"
        lines = [f"{server.url}/i/{n}.jpg" for n in range(2000)]
        lines += [f"{server.url}/status/404/{n}" for n in range(20)]
        urls.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = clean_env(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="60000",
            OTEL_BSP_SCHEDULE_DELAY="60000",
            OTEL_BLRP_SCHEDULE_DELAY="60000",
        )
        command = [sys.executable, "-m", "downloader", "fetch", str(urls), "-o", f"{tmp}/out"]
        command += ["--processes", "2", "--shard-size", "250", "--tries", "1", *sys.argv[1:]]
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        print(f"exit {done.returncode} in {time.monotonic() - started:.1f} s")
        print(done.stderr.strip().splitlines()[-3])
        rows: dict[tuple[str, int], collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        for log in receiver.logs():
            rows[(log.role, log.pid)]["logs"] += 1
        for span in receiver.spans():
            rows[(span.role, span.pid)][f"spans {span.name}"] += 1
        for point in receiver.points():
            rows[(point.role, point.pid)]["metric points"] += 1
        for (role, pid), counts in sorted(rows.items(), key=str):
            print(
                f"{role:<7} pid {pid}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
