"""SOCKS5 proxies through aiohttp-socks (the optional extra ``imgdl[socks]``).

A SOCKS proxy is a property of a connector, not of a request, so each SOCKS
proxy gets a session of its own in the worker (see transport.socks_session).
The connector keeps the network policy: the proxy's address, and for
``socks5://`` the target's, come from the worker's GuardedResolver (python-socks
would otherwise resolve them itself, past the policy), so the proxy is handed an
address that passed it; for ``socks5h://`` the proxy resolves the name, which
the fetcher's TargetCheck resolved and checked first (the residual risk is that
of HTTP proxies: docs/architecture.md). Only this module imports aiohttp_socks.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from aiohttp.client_proto import ResponseHandler
from aiohttp_socks import ProxyConnectionError, ProxyConnector, ProxyError, ProxyTimeoutError
from python_socks import ProxyType
from python_socks.async_.asyncio.v2 import Proxy as SocksClient

from downloader.proxy import Proxy
from downloader.transport import GuardedResolver

#: What a SOCKS proxy that is down, refuses or fails raises (not aiohttp errors).
SOCKS_ERRORS = (ProxyConnectionError, ProxyError)
SOCKS_TIMEOUT = ProxyTimeoutError


class _Handler(ResponseHandler):
    """Keeps the stream writer alive with its transport (as aiohttp-socks does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter) -> None:
        super().__init__(loop)
        self._writer = writer


class GuardedSocksConnector(ProxyConnector):
    """aiohttp-socks' connector, with every address it connects to from the guard."""

    def __init__(self, proxy: Proxy, guard: GuardedResolver, **kwargs: Any) -> None:
        user, password = proxy.auth or (None, None)
        super().__init__(
            host=proxy.url.raw_host or "",
            port=proxy.url.port or 1080,
            proxy_type=ProxyType.SOCKS5,
            username=user,
            password=password,
            rdns=proxy.remote_dns,
            **kwargs,
        )
        self._socks = proxy
        self._guard = guard

    async def _address(self, host: str, port: int) -> str:
        """An address of ``host`` that the policy allows (BlockedAddressError if none)."""
        answers = await self._guard.resolve(host, port, socket.AF_UNSPEC)
        return str(answers[0]["host"])

    async def _connect_via_proxy(
        self,
        host: str,
        port: int,
        ssl: ssl.SSLContext | None = None,
        timeout: float | None = None,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        socks = self._socks
        user, password = socks.auth or (None, None)
        client = SocksClient(
            proxy_type=ProxyType.SOCKS5,
            host=await self._address(socks.url.raw_host or "", socks.url.port or 1080),
            port=socks.url.port or 1080,
            username=user,
            password=password,
            rdns=socks.remote_dns,
        )
        target = host if socks.remote_dns else await self._address(host, port)
        stream = await client.connect(dest_host=target, dest_port=port, timeout=timeout)
        if ssl is not None:  # TLS for the name, not for the address it was sent to
            try:
                stream = await stream.start_tls(hostname=host, ssl_context=ssl)
            except BaseException:
                await stream.close()
                raise
        transport: asyncio.Transport = stream.writer.transport  # type: ignore[assignment]
        protocol = _Handler(self._loop, stream.writer)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return transport, protocol
