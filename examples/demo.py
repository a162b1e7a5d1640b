"""The README's first command: serve the bundled images on 127.0.0.1 and fetch them.

Works offline. The list mixes good URLs with a few broken ones on purpose, so the
run shows the manifest and the failures file doing their job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from downloader.devserver import ALLOW_LOOPBACK, DevServer

OUT = Path("demo-out")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    with DevServer() as server:
        urls = [f"{server.url}/i/{n}.jpg" for n in range(500)]
        urls += [
            f"{server.url}/status/404/1",  # http_error
            f"{server.url}/html/1",  # an HTML page claiming to be a JPEG: not_an_image
            f"{server.url}/truncated/2",  # a body cut short: truncated
            "ftp://example.invalid/x.jpg",  # invalid_url
        ]
        listing = OUT / "urls.txt"
        listing.write_text("# demo list\n" + "\n".join(urls) + "\n", encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "downloader",
            "fetch",
            str(listing),
            "-o",
            str(OUT / "images"),
            "--log-level",
            "warning",
        ]
        print("$", " ".join(["imgdl", *command[3:]]), flush=True)
        # The network policy refuses loopback by default; this demo's server lives there.
        env = {**os.environ, **ALLOW_LOOPBACK}
        code = subprocess.run(command, check=False, env=env).returncode
    summary = json.loads((OUT / "images" / "summary.json").read_text())
    print(f"\nexit code {code} (1: some URLs failed, as planned)")
    print(f"images:   {OUT / 'images'}/  ({summary['saved']} saved)")
    print(f"manifest: {OUT / 'images' / 'manifest.jsonl'}")
    print(f"failures: {OUT / 'images' / 'failures.txt'}")
    ok = code == 1 and summary["saved"] == 500 and summary["failed"] == 4
    print("demo OK" if ok else "demo FAILED: unexpected result")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
