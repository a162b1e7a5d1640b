"""Kill a run with kill -9 (parent and workers) halfway, run the same command again, count.

    .venv/bin/python bench/resume_check.py [N]

Prints what the folder holds afterwards: images, manifest records, lines with
more than one record, images whose bytes differ from what the server serves,
leftover part files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer
from downloader.proctree import descendants

ENV = {**os.environ, **ALLOW_LOOPBACK}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    tmp = Path(tempfile.mkdtemp())
    out = tmp / "out"
    with DevServer() as server:
        listing = tmp / "u.txt"
        listing.write_text("".join(f"{server.url}/slow/20/{n}\n" for n in range(count)))
        command = [
            sys.executable,
            "-m",
            "downloader",
            "fetch",
            str(listing),
            "-o",
            str(out),
            "--shard-size",
            "100",
            "--log-level",
            "warning",
        ]
        proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, env=ENV)
        while len(server.requests) < count // 2:
            time.sleep(0.01)
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        first = len(server.requests)
        files_after_kill = sum(
            1
            for p in out.rglob("*")
            if p.is_file()
            and ".imgdl" not in p.parts
            and p.suffix in (".jpg", ".png", ".gif", ".webp")
        )
        again = subprocess.run(command, capture_output=True, text=True, env=ENV, check=False)
        second = len(server.requests) - first
        records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        per_line = Counter(r["line"] for r in records)
        wrong = 0
        for record in records:
            if record["path"]:
                n = int(record["url"].rsplit("/", 1)[1])
                wrong += (out / record["path"]).read_bytes() != server.image(n)[0]
    images = [
        p
        for p in out.rglob("*")
        if p.is_file()
        and p.parent.name != ".imgdl"
        and p.suffix in (".jpg", ".png", ".gif", ".webp")
    ]
    print(
        f"killed after {first} requests with {files_after_kill} images on disk; "
        f"second run: exit {again.returncode}, {second} requests"
    )
    print(
        f"images {len(images)} of {count}; manifest records {len(records)}; "
        f"lines with more than one record {sum(1 for v in per_line.values() if v > 1)}; "
        f"lines without {count - len(per_line)}; images not byte-identical {wrong}; "
        f"part files {len(list(out.rglob('*.part')))}"
    )
    print(f"statuses {Counter((r['status'], r['reason']) for r in records)}")


if __name__ == "__main__":
    main()
