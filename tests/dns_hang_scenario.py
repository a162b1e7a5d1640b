"""Run inside a network and mount namespace of its own (``unshare -n -m``); prints JSON.

The namespace's resolver is a listener on 127.0.0.1:53 that takes every DNS query and
never answers (a resolv.conf bind-mounted over the machine's, with a timeout of
``RESOLVER_SECONDS``), and its hosts file does not know ``hang.test``. imgdl fetches
``http://hang.test/a.png`` with ``http.total_timeout`` shorter than the resolver's
own timeout: the request must end at its deadline, as a timeout, however long the
resolver would wait. Nothing leaves the namespace.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.netns_scenario import fetch_here

#: How long the C library's resolver waits for the silent server (one attempt).
RESOLVER_SECONDS = 4
#: The request's whole budget: well under the resolver's wait.
TOTAL_TIMEOUT = 1


def setup_namespace(folder: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = folder / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\noptions timeout:{RESOLVER_SECONDS} attempts:1\n")
    hosts = folder / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)


def silent_dns() -> list[bytes]:
    """A DNS server on 127.0.0.1:53 (UDP and TCP) that reads queries and never answers."""
    queries: list[bytes] = []
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 53))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 53))
    tcp.listen(8)

    def read() -> None:
        while True:
            queries.append(udp.recv(512))

    threading.Thread(target=read, daemon=True).start()
    return queries


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    setup_namespace(folder)
    queries = silent_dns()
    env = {"IMGDL_NETWORK_ALLOW": "127.0.0.0/8", "IMGDL_HTTP_TOTAL_TIMEOUT": str(TOTAL_TIMEOUT)}
    done, records = fetch_here(["http://hang.test/a.png"], env, *sys.argv[1:])
    print(
        json.dumps(
            {
                "queries": len(queries),
                "records": [[r["reason"], r["error"]] for r in records],
                "stderr_tail": done.stderr[-2000:],
            }
        )
    )


if __name__ == "__main__":
    main()
