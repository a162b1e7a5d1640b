"""The worker's aiohttp sessions: requests through proxies, and all of them with
``http.client: aiohttp``.

Everything about how those bytes travel is configured here, once: connector,
guarded resolver, TLS, timeouts, headers, and what aiohttp's errors mean. Only
this module (and ``socks.py`` below it) imports aiohttp on the download path, and
only when a request needs it: a worker whose requests all go straight to their
servers through the builtin client (``httpclient.py``) never loads it.
"""

from __future__ import annotations

import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from downloader.httpclient import MAX_HEADER_LINE
from downloader.httperrors import HeadLost
from downloader.netpolicy import NetworkPolicy, allowed_answers
from downloader.outcomes import Reason
from downloader.proxy import Proxy
from downloader.settings import Settings
from downloader.tls import ssl_context


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses the policy allows."""

    def __init__(self, policy: NetworkPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return allowed_answers(self.policy, host, await self.inner.resolve(host, port, family))

    async def close(self) -> None:
        await self.inner.close()


_session: aiohttp.ClientSession | None = None
#: A worker's sessions for SOCKS proxies, one per proxy (URL and credentials).
_socks_sessions: dict[tuple[str, tuple[str, str] | None], aiohttp.ClientSession] = {}


def process_session(settings: Settings, policy: NetworkPolicy) -> aiohttp.ClientSession:
    """The session for direct requests (``http.client: aiohttp``) and those through HTTP
    proxies: one per worker process, opened at its first request and kept from shard to
    shard on the worker's one event loop, with its connections and DNS cache."""
    global _session
    if _session is None or _session.closed:
        http = settings.http
        connector = aiohttp.TCPConnector(
            limit=http.concurrency,
            ttl_dns_cache=http.dns_cache_ttl or None,
            use_dns_cache=http.dns_cache_ttl > 0,
            resolver=GuardedResolver(policy),
            ssl=ssl_context(settings.tls),
        )
        _session = _new_session(settings, connector)
    return _session


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
        session = _socks_sessions[key] = _new_session(settings, connector)
    return session


async def close_sessions() -> None:
    global _session
    if _session is not None:
        await _session.close()
        _session = None
    while _socks_sessions:
        await _socks_sessions.popitem()[1].close()


def _new_session(settings: Settings, connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
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


async def request(
    settings: Settings,
    policy: NetworkPolicy,
    url: URL,
    headers: dict[str, str],
    proxy: Proxy | None,
) -> aiohttp.ClientResponse:
    """Send the request through aiohttp and read the response head; a connection that
    breaks before the head is complete is a protocol error (the server spoke, then
    hung up)."""
    if proxy is not None and proxy.socks:
        return await _through_socks(settings, policy, url, headers, proxy)
    if proxy is not None and url.scheme == "http":
        # aiohttp sends proxy_headers with CONNECT only; a plain http request is
        # itself the proxy's (never for https: it would travel inside the tunnel).
        headers = {**headers, **proxy.headers}
    try:
        return await process_session(settings, policy).get(
            url,
            allow_redirects=False,
            headers=headers,
            proxy=proxy.url if proxy else None,
            proxy_headers=proxy.headers if proxy else None,
        )
    except aiohttp.ClientProxyConnectionError as exc:
        assert proxy is not None
        raise aiohttp.ClientConnectionError(f"proxy {proxy.shown}: {exc}") from None
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise HeadLost(str(exc) or type(exc).__name__) from None


async def _through_socks(
    settings: Settings, policy: NetworkPolicy, url: URL, headers: dict[str, str], proxy: Proxy
) -> aiohttp.ClientResponse:
    """The request through a SOCKS proxy: on that proxy's own session, whose
    connector speaks SOCKS5 (aiohttp-socks); its errors are not aiohttp's."""
    from downloader.socks import SOCKS_ERRORS, SOCKS_TIMEOUT  # optional library

    session = socks_session(settings, policy, proxy)
    try:
        return await session.get(url, allow_redirects=False, headers=headers)
    except SOCKS_TIMEOUT as exc:
        raise TimeoutError(f"proxy {proxy.shown}: {exc}") from None
    except SOCKS_ERRORS as exc:
        raise aiohttp.ClientConnectionError(f"proxy {proxy.shown}: {exc}") from None
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise HeadLost(str(exc) or type(exc).__name__) from None


#: What reading an aiohttp response's body may raise, besides TimeoutError.
BODY_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError,)


def classify(exc: BaseException, message: str) -> tuple[Reason, str] | None:
    """The reason of an aiohttp error; None for any other exception."""
    # Order matters: the TLS errors subclass the connector errors.
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            message += " (a private CA? trust it with tls.ca_bundle or SSL_CERT_FILE)"
        return Reason.TLS_ERROR, message
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return Reason.TIMEOUT, message if str(exc) else "timed out"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return Reason.TOO_MANY_REDIRECTS, message
    if isinstance(exc, aiohttp.RedirectClientError):  # e.g. a malformed Location
        return Reason.PROTOCOL_ERROR, message
    if isinstance(exc, aiohttp.InvalidURL):
        return Reason.INVALID_URL, message
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Reason.TRUNCATED, message
    if isinstance(exc, aiohttp.ClientResponseError):
        return Reason.PROTOCOL_ERROR, message
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionError):
        return Reason.CONNECTION_ERROR, message
    if isinstance(exc, aiohttp.ClientError):
        return Reason.PROTOCOL_ERROR, message
    return None
