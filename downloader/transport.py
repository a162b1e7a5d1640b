"""The HTTP session of a worker: connection pool, resolver, TLS, timeouts, headers.

Everything about *how* bytes travel is configured here, once, so that the
worker only orchestrates and the fetcher only downloads.
"""

from __future__ import annotations

import aiohttp

from downloader.netpolicy import GuardedResolver, NetworkPolicy
from downloader.settings import Settings
from downloader.tls import ssl_context

#: Longest status line / header line accepted; a longer one is a protocol error.
MAX_HEADER_LINE = 16 * 1024


def open_session(settings: Settings, policy: NetworkPolicy) -> aiohttp.ClientSession:
    http = settings.http
    connector = aiohttp.TCPConnector(
        limit=http.concurrency,
        ttl_dns_cache=http.dns_cache_ttl or None,
        use_dns_cache=http.dns_cache_ttl > 0,
        resolver=GuardedResolver(policy),
        ssl=ssl_context(settings.tls),
    )
    timeout = aiohttp.ClientTimeout(
        total=http.total_timeout,
        sock_connect=http.connect_timeout,
        sock_read=http.read_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        # identity: we decompress nothing on the fly, so ask for the bytes as they are
        headers={"User-Agent": http.user_agent, "Accept-Encoding": "identity"},
        max_line_size=MAX_HEADER_LINE,
        max_field_size=MAX_HEADER_LINE,
    )
