"""An s3:// run against a real S3 server on loopback (moto), then the same command twice.

    .venv/bin/python bench/s3_resume_check.py

500 images and 5 404s from the dev server into s3://demo/run1 on moto (tests/s3server.py,
needs the dev extra): run 1, run 2 (the same command), run 3 (the local state folder
deleted: a new machine). Prints the objects in the bucket and the requests each run
made to the image server: runs 2 and 3 must fetch only the 5 failed URLs again.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from downloader.devserver import DevServer
from tests.conftest import clean_env
from tests.s3server import CREDENTIALS, MotoServer


def main() -> int:
    with MotoServer() as moto, DevServer() as server, tempfile.TemporaryDirectory() as tmp:
        client = moto.client()
        client.create_bucket(Bucket="demo")
        urls = Path(tmp) / "urls.txt"
        lines = [f"{server.url}/i/{n}.jpg" for n in range(500)]
        lines += [f"{server.url}/status/404/{n}" for n in range(5)]
        urls.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = clean_env(
            **CREDENTIALS,
            AWS_ENDPOINT_URL=moto.url,
            IMGDL_NETWORK_ALLOW="[127.0.0.1/32]",  # the images; the store needs no allowance
            HOME=tmp,
        )
        state = Path(tmp) / "state"
        command = [sys.executable, "-m", "downloader", "fetch", str(urls), "-o", "s3://demo/run1"]
        command += ["--state-dir", str(state), "--no-progress"]

        def objects() -> int:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket="demo", Prefix="run1/")
            return sum(len(page.get("Contents", [])) for page in pages)

        for label in ("run 1", "run 2 (same command)", "run 3 (local state deleted)"):
            if label.startswith("run 3"):
                shutil.rmtree(state)
            before = len(server.requests)
            started = time.monotonic()
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            print(
                f"{label}: exit {done.returncode} in {time.monotonic() - started:.1f} s; "
                f"requests to the image server {len(server.requests) - before}; "
                f"objects in s3://demo/run1/ {objects()}"
            )
            print("  " + done.stderr.strip().splitlines()[-4])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
