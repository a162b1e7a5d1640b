"""CPU per request of the two HTTP clients alone, no imgdl around them: the builtin
client (httpclient.py) and an aiohttp session set up as transport.py sets it.

    .venv/bin/python bench/client_cost.py URLS.txt [builtin|aiohttp] [IN_FLIGHT]

One process, uvloop, IN_FLIGHT (default 64) requests at once over the list, every
body read and dropped. Use the list compare.py leaves in /dev/shm/imgdl-bench/urls.txt
while its nginx runs, or any server on loopback.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time

import uvloop
from yarl import URL

from downloader.netpolicy import NetworkPolicy
from downloader.settings import Settings


async def with_builtin(urls: list[URL], in_flight: int) -> None:
    from downloader.httpclient import HttpClient

    client = HttpClient(Settings(), NetworkPolicy.from_strings(["127.0.0.0/8", "::1/128"]))

    async def consumer() -> None:
        while urls:
            response = await client.get(urls.pop(), {})
            async with response:
                async for _ in response.content.iter_chunked(65536):
                    pass

    await asyncio.gather(*(consumer() for _ in range(in_flight)))
    await client.close()


async def with_aiohttp(urls: list[URL], in_flight: int) -> None:
    from downloader import transport

    settings = Settings.model_validate({"network": {"allow": ["127.0.0.0/8", "::1/128"]}})
    session = transport.process_session(
        settings, NetworkPolicy.from_strings(settings.network.allow)
    )

    async def consumer() -> None:
        while urls:
            async with session.get(urls.pop(), allow_redirects=False) as response:
                async for _ in response.content.iter_chunked(65536):
                    pass

    await asyncio.gather(*(consumer() for _ in range(in_flight)))
    await transport.close_sessions()


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as listing:
        urls = [URL(u) for u in listing.read().split()]
    which = sys.argv[2] if len(sys.argv) > 2 else "builtin"
    in_flight = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    count = len(urls)
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    uvloop.run((with_builtin if which == "builtin" else with_aiohttp)(urls, in_flight))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"{which}: {count / wall:,.0f} requests/s, {cpu / count * 1000:.3f} CPU ms per request")


if __name__ == "__main__":
    main()
