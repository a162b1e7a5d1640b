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

import asyncio
import dataclasses
import ipaddress
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from downloader.httperrors import ConnectError

_K = TypeVar("_K")
_V = TypeVar("_V")
_A = TypeVar("_A", bound=Mapping[str, object])
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
    #: check_host's answers by host: hashing the policy for a shared cache hashed every
    #: network of ``allow`` on every request (issue 5)
    _verdicts: dict[str, str | None] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
        try:
            why = self._verdicts[host]
        except KeyError:
            address = parse_host(host)
            why = self.refuses(address) if address is not None else None
            if len(self._verdicts) < _VERDICTS_KEPT:
                self._verdicts[host] = why
        if why:
            raise BlockedAddressError(why)


#: Hosts whose answer check_host keeps (a crawl of many hosts must not grow it for ever).
_VERDICTS_KEPT = 4096


class SystemResolver:
    """Names to addresses through the event loop's ``getaddrinfo`` (uvloop's, or a
    thread), with the flags aiohttp's default resolver uses; answers as aiohttp's
    resolvers give them (``host``, ``port``, ``family``), so that either fits."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[dict[str, Any]]:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, family=family, flags=socket.AI_ADDRCONFIG
        )
        seen = dict.fromkeys((int(info[0]), str(info[4][0])) for info in infos)
        return [{"host": address, "port": port, "family": fam} for fam, address in seen]

    async def close(self) -> None:
        pass


#: Hosts whose DNS answers (or verdicts) are kept: a crawl over a million hosts keeps
#: the latest ones, not all.
CACHED_HOSTS = 4096


def remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """``cache[key] = value``, dropping the oldest entry when ``CACHED_HOSTS`` are held."""
    if key not in cache and len(cache) >= CACHED_HOSTS:
        del cache[next(iter(cache))]
    cache[key] = value


def refused_answers(policy: NetworkPolicy, answers: Sequence[Mapping[str, object]]) -> list[str]:
    """Why each refused address of a DNS answer is refused."""
    return [why for a in answers if (why := policy.refuses(ipaddress.ip_address(str(a["host"]))))]


def allowed_answers(policy: NetworkPolicy, host: str, answers: Sequence[_A]) -> list[_A]:
    """The answers for ``host`` the policy allows (the builtin client's and aiohttp's
    resolvers alike); BlockedAddressError, naming why, when none is left."""
    allowed = [a for a in answers if not policy.refuses(ipaddress.ip_address(str(a["host"])))]
    if not allowed:
        reasons = "; ".join(refused_answers(policy, answers))
        raise BlockedAddressError(f"{host} resolves only to refused addresses: {reasons}")
    return allowed


class AddressGuard:
    """The addresses a connection to ``host`` may go to: a literal one if the policy
    allows it, a name's DNS answer without the addresses the policy refuses
    (BlockedAddressError if none is left), cached for ``ttl`` seconds."""

    def __init__(
        self, policy: NetworkPolicy, ttl: float = 0, resolver: SystemResolver | None = None
    ) -> None:
        self.policy = policy
        self.ttl = ttl
        self.resolver = resolver or SystemResolver()
        self._cache: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}

    async def addresses(self, host: str, port: int) -> list[tuple[int, str]]:
        literal = parse_host(host)
        if literal is not None:
            self.policy.check_host(host)
            return [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
        now = time.monotonic()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            answers = await self.resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        allowed = [
            (int(a["family"]), str(a["host"])) for a in allowed_answers(self.policy, host, answers)
        ]
        if self.ttl > 0:
            remember(self._cache, (host, port), (now + self.ttl, allowed))
        return allowed


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
        self, policy: NetworkPolicy, resolver: SystemResolver | None = None, ttl: float = 60
    ) -> None:
        self.policy = policy
        self.resolver = resolver or SystemResolver()
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
            remember(self._verdicts, host, cached)
        if cached[1]:
            raise BlockedAddressError(cached[1])

    async def _verdict(self, host: str) -> str | None:
        try:
            answers = await self.resolver.resolve(host, 0, socket.AF_UNSPEC)
        except OSError as exc:
            raise ConnectError(
                f"cannot resolve {host} to check it before the proxy: {exc}"
            ) from None
        reasons = refused_answers(self.policy, answers)
        if reasons:
            return f"{host} resolves to refused addresses ({'; '.join(reasons)})"
        return None

    async def close(self) -> None:
        await self.resolver.close()
