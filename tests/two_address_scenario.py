"""Run inside a network and mount namespace of its own (``unshare -n -m``); prints JSON.

``two.test`` names two addresses (a hosts file bind-mounted over /etc/hosts): the
first, 127.0.0.1, has a listener whose backlog is full, so that a connection to it
is never answered (as a black-holed address: broken IPv6, a dead server behind a
firewall that drops); the second, 127.0.0.2, serves images on the same port. A
request that gives up on the first address fails; one that tries the next, as
aiohttp's connector does, saves the image.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from downloader.devserver import DevServer
from tests.netns_scenario import fetch_here


def silent_listener(port: int) -> list[socket.socket]:
    """127.0.0.1:PORT with a full backlog: the kernel drops every further SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    held = [listener]
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        held.append(filler)
    return held


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with DevServer(host="127.0.0.2") as server:
        port = int(server.url.rsplit(":", 1)[1])
        held = silent_listener(port)
        hosts = Path(tempfile.mkdtemp()) / "hosts"
        hosts.write_text("127.0.0.1 localhost\n127.0.0.1 two.test\n127.0.0.2 two.test\n")
        subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
        order = [a[4][0] for a in socket.getaddrinfo("two.test", port, type=socket.SOCK_STREAM)]
        env = {"IMGDL_NETWORK_ALLOW": "127.0.0.0/8", "IMGDL_HTTP_CONNECT_TIMEOUT": "1"}
        done, records = fetch_here([f"http://two.test:{port}/i/1.jpg"], env, *sys.argv[1:])
        for sock in held:
            sock.close()
    print(
        json.dumps(
            {
                "order": order,
                "records": [[r["status"], r["reason"], r["error"]] for r in records],
                "stderr_tail": done.stderr[-2000:],
            }
        )
    )


if __name__ == "__main__":
    main()
