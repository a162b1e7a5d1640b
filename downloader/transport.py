"""The HTTP session of a worker: connection pool, resolver, TLS, timeouts, headers.

Everything about *how* bytes travel is configured here, once, so that the
worker only orchestrates and the fetcher only downloads.
"""

from __future__ import annotations

import aiohttp

from downloader.netpolicy import GuardedResolver, NetworkPolicy
from downloader.proxy import Proxy
from downloader.settings import Settings
from downloader.tls import ssl_context

#: Longest status line / header line accepted; a longer one is a protocol error.
MAX_HEADER_LINE = 16 * 1024


#: A worker's sessions for SOCKS proxies, one per proxy (URL and credentials).
_socks_sessions: dict[tuple[str, tuple[str, str] | None], aiohttp.ClientSession] = {}


def open_session(settings: Settings, policy: NetworkPolicy) -> aiohttp.ClientSession:
    """The session for direct requests and those through HTTP proxies."""
    http = settings.http
    connector = aiohttp.TCPConnector(
        limit=http.concurrency,
        ttl_dns_cache=http.dns_cache_ttl or None,
        use_dns_cache=http.dns_cache_ttl > 0,
        resolver=GuardedResolver(policy),
        ssl=ssl_context(settings.tls),
    )
    return _session(settings, connector)


def socks_session(settings: Settings, policy: NetworkPolicy, proxy: Proxy) -> aiohttp.ClientSession:
    """The session of the requests through the SOCKS proxy ``proxy``, opened at its first
    request and kept for the worker's life like the other one."""
    key = (str(proxy.url), proxy.auth)
    session = _socks_sessions.get(key)
    if session is None or session.closed:
        from downloader.socks import GuardedSocksConnector  # aiohttp-socks: optional

        connector = GuardedSocksConnector(
            proxy,
            GuardedResolver(policy),
            limit=settings.http.concurrency,
            ssl=ssl_context(settings.tls),
        )
        session = _socks_sessions[key] = _session(settings, connector)
    return session


async def close_socks_sessions() -> None:
    while _socks_sessions:
        await _socks_sessions.popitem()[1].close()


def _session(settings: Settings, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    http = settings.http
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
