"""Forward proxies: which proxy a URL goes through, like curl decides it, and
proxy URLs with their password hidden wherever they are shown.

The proxy of a run comes from ``network.proxy`` when it is set (an empty string:
no proxy at all), else from the environment like curl: ``http_proxy`` for http
URLs, ``https_proxy`` for https URLs, ``all_proxy`` for both when those are unset;
the upper-case forms count too, the lower-case form wins when both are set.
``network.no_proxy``, else ``no_proxy`` / ``NO_PROXY``, lists the hosts that are
reached directly: ``*`` (every host), a domain (itself and every subdomain; a
leading dot or ``*.`` changes nothing), an IP address, a network in CIDR form, any
of them with ``:port`` to match that port only.

HTTP proxies (``http://`` proxy URLs; https URLs go through them with CONNECT)
and, with the optional aiohttp-socks library (``pip install 'imgdl[socks]'``),
SOCKS5 proxies: ``socks5://`` (imgdl resolves the target and hands the proxy an
address) and ``socks5h://`` (the proxy resolves the name; imgdl still resolves
and checks it first). The credentials of an HTTP proxy URL are sent in
``Proxy-Authorization``, those of a SOCKS5 URL in its username/password
handshake; neither is ever passed to aiohttp inside a URL, so no error message
can carry them.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import ipaddress
from collections.abc import Iterable, Mapping

from yarl import URL

#: Where a proxy URL's password stood, once shown.
HIDDEN = "***"
#: The SOCKS schemes; socks5h: the proxy resolves the target's name.
SOCKS_SCHEMES = frozenset({"socks5", "socks5h"})
#: How to get what SOCKS proxies need.
SOCKS_INSTALL = "pip install 'imgdl[socks]'"

_ENV_FOR = {"http": ("http_proxy", "HTTP_PROXY"), "https": ("https_proxy", "HTTPS_PROXY")}
_ENV_ALL = ("all_proxy", "ALL_PROXY")
_ENV_NO = ("no_proxy", "NO_PROXY")
#: The environment variables that can name a proxy or its exceptions.
PROXY_ENV = tuple(n for names in (*_ENV_FOR.values(), _ENV_ALL, _ENV_NO) for n in names)


def redact(text: str) -> str:
    """``http://user:pass@host:3128`` as ``http://user:***@host:3128``; any text that
    is not a URL with a password is returned as it is."""
    try:
        url = URL(text)
    except (TypeError, ValueError):
        return text
    if url.password is None or not url.host:
        return text
    return str(url.with_password(HIDDEN))


def _first(env: Mapping[str, str], names: Iterable[str]) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip():
            return value.strip()
    return None


def _with_scheme(proxy: str) -> str:
    """curl reads ``host:3128`` as ``http://host:3128``."""
    return proxy if "://" in proxy else f"http://{proxy}"


@dataclasses.dataclass(frozen=True)
class Proxy:
    """One proxy as aiohttp takes it: its URL without credentials, and those apart."""

    url: URL
    headers: Mapping[str, str]  # Proxy-Authorization, when an HTTP proxy URL holds credentials
    shown: str  # for messages: the URL with the password hidden
    #: a SOCKS5 proxy's username and password, for its handshake
    auth: tuple[str, str] | None = dataclasses.field(default=None, repr=False)

    @property
    def socks(self) -> bool:
        """A SOCKS5 proxy: set per connector (a session of its own), not per request."""
        return self.url.scheme in SOCKS_SCHEMES

    @property
    def remote_dns(self) -> bool:
        """socks5h: the proxy resolves the target's name."""
        return self.url.scheme == "socks5h"

    @classmethod
    def parse(cls, text: str) -> Proxy:
        url = URL(_with_scheme(text))
        scheme = url.scheme.lower()
        if scheme not in {"http", *SOCKS_SCHEMES} or not url.host:
            raise ValueError(
                f"not a supported proxy URL: {redact(text)!r}; write "
                "http://[user:password@]host:port, or socks5:// or socks5h:// for a SOCKS5 proxy"
            )
        shown = redact(str(url))
        bare = url.with_user(None).with_password(None).with_scheme(scheme)
        if scheme in SOCKS_SCHEMES:
            if importlib.util.find_spec("aiohttp_socks") is None:
                raise ValueError(
                    f"the SOCKS proxy {shown} needs the aiohttp-socks library: {SOCKS_INSTALL}"
                )
            if url.port is None:  # curl's default for SOCKS
                bare = bare.with_port(1080)
            auth = (url.user, url.password or "") if url.user is not None else None
            return cls(bare, {}, shown, auth)
        headers = {}
        if url.user is not None:
            pair = f"{url.user}:{url.password or ''}".encode()
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(bare, headers, shown)


@dataclasses.dataclass(frozen=True)
class ProxyRules:
    """The proxies of a run and the hosts that bypass them."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_settings(
        cls, proxy: str | None, no_proxy: list[str] | None, env: Mapping[str, str]
    ) -> ProxyRules:
        """``proxy``: network.proxy (None: from the environment; "": none at all)."""
        if proxy is not None:
            chosen = Proxy.parse(proxy) if proxy.strip() else None
            http = https = chosen
        else:
            every = _first(env, _ENV_ALL)
            http_text = _first(env, _ENV_FOR["http"]) or every
            https_text = _first(env, _ENV_FOR["https"]) or every
            http = Proxy.parse(http_text) if http_text else None
            https = Proxy.parse(https_text) if https_text else None
        if no_proxy is None:
            no_proxy = (_first(env, _ENV_NO) or "").split(",")
        return cls(http, https, tuple(e.strip() for e in no_proxy if e.strip()))

    @property
    def proxies(self) -> tuple[Proxy, ...]:
        return tuple(p for p in dict.fromkeys((self.http, self.https)) if p is not None)

    def for_url(self, url: URL) -> Proxy | None:
        """The proxy ``url`` goes through, or None for a direct connection."""
        proxy = self.https if url.scheme == "https" else self.http
        if proxy is None or bypasses(url.raw_host or "", url.port, self.no_proxy):
            return None
        return proxy


def bypasses(host: str, port: int | None, no_proxy: Iterable[str]) -> bool:
    """Whether ``host`` (on ``port``) is reached directly by the ``no_proxy`` entries."""
    from downloader.netpolicy import parse_host  # aiohttp: workers only, not the parent

    host = host.strip("[]").rstrip(".").lower()
    address = parse_host(host)
    for entry in no_proxy:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        pattern, want_port = _split_port(entry)
        if want_port is not None and want_port != port:
            continue
        if address is not None:
            try:
                network = ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                continue
            if network.version == address.version and address in network:
                return True
            continue
        pattern = pattern.removeprefix("*").lstrip(".").rstrip(".")
        if pattern and (host == pattern or host.endswith("." + pattern)):
            return True
    return False


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:80`` -> (host, 80); ``[::1]:80`` -> (::1, 80); ``::1`` -> (::1, None)."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        return inside, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None
