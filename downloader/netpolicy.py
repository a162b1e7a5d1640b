"""Which addresses imgdl may connect to: the guard against server-side request forgery.

A URL list is untrusted, and so is every redirect. By default imgdl refuses
every address that is not globally routable: loopback, private ranges, link-local
(169.254.0.0/16 holds the cloud metadata services, whose answers can hold
credentials), carrier-grade NAT, multicast, reserved and unspecified addresses,
in IPv4 and IPv6, including IPv4 addresses embedded in IPv6 (mapped, 6to4,
Teredo, NAT64). ``network.allow`` lists networks to let through anyway (a local
test server: ``[127.0.0.0/8]``).

The check runs on the address actually connected to: a resolver that drops
refused addresses from every DNS answer (so a name that resolves, or re-resolves,
to a refused address cannot pass) and, because aiohttp does not call the
resolver for a host that is an IP literal, a check of every URL's host before
its request, on the first URL and on every redirect hop. That check also reads
the spellings of IPv4 that ``inet_aton`` accepts (``2852039166``,
``0xa9fea9fe``, ``0251.0376.0251.0376``), which a system resolver would turn
into the same address.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import socket
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddressError(Exception):
    """A request would go to an address the network policy refuses."""


def parse_host(host: str) -> IPAddress | None:
    """The address a host names literally, in any spelling; None for a DNS name."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:  # 2852039166, 0xa9fea9fe, 0251.0376.0251.0376, 169.254.43518, ...
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, still routed by some stacks
_METADATA_RANGE = ipaddress.IPv4Network("169.254.0.0/16")


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 0xFFFF):
        # 64:ff9b::a.b.c.d, and ::a.b.c.d (but :: and ::1 are themselves)
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclasses.dataclass(frozen=True)
class NetworkPolicy:
    allow: tuple[IPNetwork, ...] = ()
    block_non_global: bool = True

    @classmethod
    def from_strings(cls, allow: Iterable[str], block_non_global: bool = True) -> NetworkPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in allow), block_non_global)

    def refuses(self, address: IPAddress) -> str | None:
        """Why ``address`` is refused, or None if it may be connected to."""
        if any(address in network for network in self.allow if network.version == address.version):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            inner = _embedded_v4(address)
            if inner is not None:
                why = self.refuses(inner)
                return f"{address} carries {inner}: {why}" if why else None
        if not self.block_non_global:
            return None
        if address.is_multicast:
            return f"{address} is a multicast address"
        if not address.is_global:
            kind = (
                "loopback"
                if address.is_loopback
                else "link-local, where cloud metadata services live"
                if address in _METADATA_RANGE
                else "link-local"
                if address.is_link_local
                else "unspecified"
                if address.is_unspecified
                else "private"
                if address.is_private
                else "reserved or not globally routable"
            )
            return f"{address} is {kind}; allow it with network.allow"
        return None

    def check_host(self, host: str) -> None:
        """Raise BlockedAddressError if ``host`` is a literal address that is refused."""
        why = _host_verdict(self, host)
        if why:
            raise BlockedAddressError(why)


@functools.lru_cache(maxsize=4096)
def _host_verdict(policy: NetworkPolicy, host: str) -> str | None:
    """Cached: every request of a run asks about the same few hosts."""
    address = parse_host(host)
    return policy.refuses(address) if address is not None else None


class GuardedResolver(AbstractResolver):
    """A resolver that keeps only the addresses the policy allows."""

    def __init__(self, policy: NetworkPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self.inner.resolve(host, port, family)
        allowed = [a for a in answers if not self._refused(a)]
        if not allowed:
            reasons = "; ".join(filter(None, (self._refused(a) for a in answers)))
            raise BlockedAddressError(f"{host} resolves only to refused addresses: {reasons}")
        return allowed

    def _refused(self, answer: Any) -> str | None:
        return self.policy.refuses(ipaddress.ip_address(answer["host"]))

    async def close(self) -> None:
        await self.inner.close()


class TargetCheck:
    """The check of a target host whose request goes through a proxy.

    The proxy resolves the name and connects, so the GuardedResolver never sees the
    target: resolve it here first and refuse it when any of its addresses is refused
    (the proxy may pick any of them). Verdicts are kept for ``ttl`` seconds. What is
    left: the proxy resolves the name again, and a DNS server that answers
    differently the second time (DNS rebinding) still steers the proxy; see
    docs/architecture.md.
    """

    def __init__(
        self, policy: NetworkPolicy, resolver: AbstractResolver | None = None, ttl: float = 60
    ) -> None:
        self.policy = policy
        self.resolver = resolver or DefaultResolver()
        self.ttl = ttl
        self._verdicts: dict[str, tuple[float, str | None]] = {}

    async def check(self, host: str) -> None:
        """Raise BlockedAddressError if ``host`` is, or resolves to, a refused address."""
        self.policy.check_host(host)
        if parse_host(host) is not None:
            return
        now = time.monotonic()
        cached = self._verdicts.get(host)
        if cached is None or cached[0] < now:
            cached = (now + self.ttl, await self._verdict(host))
            self._verdicts[host] = cached
        if cached[1]:
            raise BlockedAddressError(cached[1])

    async def _verdict(self, host: str) -> str | None:
        try:
            answers = await self.resolver.resolve(host, 0, socket.AF_UNSPEC)
        except OSError as exc:
            raise aiohttp.ClientConnectionError(
                f"cannot resolve {host} to check it before the proxy: {exc}"
            ) from None
        reasons = [
            why for a in answers if (why := self.policy.refuses(ipaddress.ip_address(a["host"])))
        ]
        if reasons:
            return f"{host} resolves to refused addresses ({'; '.join(reasons)})"
        return None

    async def close(self) -> None:
        await self.resolver.close()
