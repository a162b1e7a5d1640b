"""Run inside a network namespace of its own (``unshare -n -m``); prints JSON results.

The namespace has only ``lo``, with 169.254.169.254 added to it, where a listener
counts every connection attempt: if imgdl's guard were broken, the request
would land here, on this machine, and be counted, never leave it. A hosts file
bind-mounted over /etc/hosts names ``metadata.test`` as 169.254.169.254.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from downloader.devserver import DevServer

METADATA = "169.254.169.254"


def setup_namespace() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"], check=True)
    hosts = Path(tempfile.mkdtemp()) / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{METADATA} metadata.test\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)


class Listener:
    """Accepts and counts connections on the metadata address, port 80."""

    def __init__(self) -> None:
        self.count = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((METADATA, 80))
        self.sock.listen(64)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            self.count += 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            conn.close()


def fetch_here(
    urls: list[str], env: dict[str, str], *flags: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """``imgdl fetch`` of ``urls`` (one try each) in this namespace, and its records."""
    workdir = Path(tempfile.mkdtemp())
    listing = workdir / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    command = ["fetch", str(listing), "-o", str(workdir / "out"), "--tries", "1", *flags]
    result = subprocess.run(
        [sys.executable, "-m", "downloader", *command],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    manifest = (workdir / "out" / "manifest.jsonl").read_text().splitlines()
    return result, [json.loads(line) for line in manifest]


def main() -> None:
    setup_namespace()
    listener = Listener()
    # The listener is real: a direct connection is counted.
    with socket.create_connection((METADATA, 80), timeout=2) as probe:
        probe.recv(100)
    assert listener.count == 1
    listener.count = 0
    meta = f"http://{METADATA}/latest/meta-data/"
    with DevServer() as server:
        cases = {
            "direct": meta,
            "redirect": f"{server.url}/redirect?to={meta}",
            "redirect_mapped_v6": f"{server.url}/redirect?to=http://[::ffff:a9fe:a9fe]/latest/",
            "hostname": "http://metadata.test/latest/meta-data/",
            "decimal": "http://2852039166/latest/meta-data/",
            "hex": "http://0xa9fea9fe/latest/meta-data/",
            "octal": "http://0251.0376.0251.0376/latest/meta-data/",
            "mapped_v6": "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
            "loopback_by_name_not_allowed_v6": "http://[::1]:9/x.jpg",
            "allowed": f"{server.url}/i/1.jpg",
        }
        result, records = fetch_here(list(cases.values()), {"IMGDL_NETWORK_ALLOW": "[127.0.0.0/8]"})
    by_url = {r["url"]: r for r in records}
    print(
        json.dumps(
            {
                "exit_code": result.returncode,
                "stderr_tail": result.stderr[-2000:],
                "metadata_connections": listener.count,
                "outcomes": {
                    name: [by_url[url]["reason"], by_url[url]["error"]]
                    for name, url in cases.items()
                },
                "server_requests": [p for _, _, p in server.requests],
            }
        )
    )


if __name__ == "__main__":
    main()
