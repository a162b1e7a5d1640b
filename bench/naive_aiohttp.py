"""The script people write instead of a tool: one session, a semaphore, write the body.

    python bench/naive_aiohttp.py URLS.txt OUTDIR [IN_FLIGHT]

No manifest, no retries, no validation, no atomic rename: the baseline.
"""

import asyncio
import sys
from pathlib import Path

import aiohttp


async def fetch(session, limit, url, outdir):
    async with limit:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    (outdir / url.rsplit("/", 1)[-1]).write_bytes(await response.read())
        except aiohttp.ClientError as exc:
            print(url, exc, file=sys.stderr)


async def main(listing, outdir, in_flight):
    outdir.mkdir(parents=True, exist_ok=True)
    urls = Path(listing).read_text().split()
    limit = asyncio.Semaphore(in_flight)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(fetch(session, limit, url, outdir) for url in urls))


if __name__ == "__main__":
    in_flight = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), in_flight))
