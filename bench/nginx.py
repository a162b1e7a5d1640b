"""nginx on 127.0.0.1 serving a folder: the benchmark's server, fast enough not to be the limit.

One worker process (the machine has two cores and the tools under test need
them), access log off, keep-alive without a request limit. ``/t/<anything>``
answers a tiny PNG and ``/404/<anything>`` a fast 404, for the memory benchmark.
Installed from the distribution's packages when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

# a 1x1 PNG
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000a49444154789c63000100000500010d0a2db40000000049454e44ae426082"
)

CONFIG = """
worker_processes {workers};
daemon off;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    types {{ image/jpeg jpg; image/png png; text/plain txt; }}
    default_type application/octet-stream;
    client_body_temp_path {state}/body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location /t/ {{ try_files /tiny.png =404; }}
        location /404/ {{ return 404; }}
    }}
}}
"""


def ensure_installed(*packages_and_binaries: tuple[str, str]) -> list[str]:
    """apt-get the packages whose binary is missing; returns the ones that could not be had."""
    missing = [pkg for pkg, binary in packages_and_binaries if not shutil.which(binary)]
    if missing:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *missing],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return [pkg for pkg, binary in packages_and_binaries if not shutil.which(binary)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Nginx:
    """nginx if it is there or can be installed, else ``bench/static_server.py``
    (``kind`` says which); ``prefer="python"`` asks for the fallback."""

    def __init__(self, root: Path, state: Path, workers: int = 1, prefer: str = "nginx") -> None:
        self.root, self.state, self.workers = root, state, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.kind = prefer
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        if self.kind == "nginx" and ensure_installed(("nginx-light", "nginx")):
            print("nginx cannot be installed: serving with bench/static_server.py", flush=True)
            self.kind = "python"
        if self.kind == "python":
            script = Path(__file__).with_name("static_server.py")
            return [sys.executable, str(script), str(self.root), str(self.port), "2"]
        config = self.state / "nginx.conf"
        config.write_text(
            CONFIG.format(workers=self.workers, state=self.state, port=self.port, root=self.root)
        )
        return [shutil.which("nginx") or "nginx", "-c", str(config)]

    def __enter__(self) -> Nginx:
        self.state.mkdir(parents=True, exist_ok=True)
        (self.root / "tiny.png").write_bytes(TINY_PNG)
        # A session of its own: the fallback's worker processes go with it at the end.
        self._process = subprocess.Popen(self._command(), start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/tiny.png", timeout=1).read()
                return self
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise SystemExit(f"{self.kind} did not start; see {self.state}") from None
                time.sleep(0.05)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(10)
