"""A run through a forward proxy with per-host credentials, then a grep for the secrets.

    .venv/bin/python bench/network_check.py

Two image servers on loopback (127.0.0.1 and 127.0.0.2: two hosts), the test suite's
counting forward proxy (tests/fwdproxy.py) with a password in HTTPS_PROXY/HTTP_PROXY,
a host rule giving 127.0.0.1 a bearer token (from an environment variable). The list:
images and a token-protected URL on the first host, and redirects from the first host
to the second. Prints what the proxy counted, what each server was sent, and every
place in the run's output and records where a secret was found (none expected).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from downloader.devserver import DevServer
from tests.conftest import clean_env
from tests.fwdproxy import ForwardProxy

TOKEN = "tok-8f1e2d-secret"
PROXY_PASSWORD = "proxy-pw-5a5a"


def main() -> int:
    with (
        DevServer() as first,
        DevServer(host="127.0.0.2") as second,
        ForwardProxy() as proxy,
        tempfile.TemporaryDirectory() as tmp,
    ):
        first.bearer_token = TOKEN
        second.bearer_token = TOKEN
        urls = [f"{first.url}/i/{n}.jpg" for n in range(5)]
        urls += [f"{first.url}/auth/bearer/1"]
        urls += [f"{first.url}/redirect?to={second.url}/auth/bearer/2"]
        urls += [f"{first.url}/redirect?to={second.url}/i/9.jpg"]
        listing = Path(tmp) / "urls.txt"
        listing.write_text("\n".join(urls) + "\n", encoding="utf-8")
        config = Path(tmp) / "imgdl.yaml"
        config.write_text(
            "network:\n  allow: [127.0.0.0/8]\n"
            "hosts:\n  rules:\n    - match: 127.0.0.1\n"
            "      auth: {type: bearer, token_env: IMAGES_TOKEN}\n",
            encoding="utf-8",
        )
        proxied = proxy.url.replace("http://", f"http://user:{PROXY_PASSWORD}@")
        env = clean_env(HTTP_PROXY=proxied, HTTPS_PROXY=proxied, IMAGES_TOKEN=TOKEN)
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "downloader", "fetch", str(listing), "-o", str(out)]
        command += ["--config", str(config), "--log-level", "debug", "--report", "--no-progress"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        show = subprocess.run(
            [sys.executable, "-m", "downloader", "config", "show", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"exit {done.returncode}; " + done.stderr.strip().splitlines()[-3])
        print(f"requests counted at the proxy: {len(proxy.seen)} (lines: {len(urls)})")
        with_auth = sum(1 for s in proxy.seen if s.proxy_authorization)
        print(f"  with Proxy-Authorization: {with_auth}")
        for name, server in (("127.0.0.1", first), ("127.0.0.2", second)):
            sent = [a for _, a, _, _ in server.credentials_seen if a]
            print(f"{name}: {len(server.requests)} requests, {len(sent)} with a token")
        leaks = []
        texts = {"stderr": done.stderr, "stdout": done.stdout, "config show": show.stdout}
        for path in out.rglob("*"):
            if path.is_file():
                texts[str(path.relative_to(out))] = path.read_text(errors="replace")
        for where, text in texts.items():
            for secret in (TOKEN, PROXY_PASSWORD):
                if secret in text:
                    leaks.append(f"{secret} in {where}")
        print(f"secrets found in {len(texts)} outputs and files: {leaks or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
