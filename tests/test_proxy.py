"""Proxies: which URL goes through which proxy, the network policy in front of the
proxy, the password hidden everywhere; end to end through a real forward proxy."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from yarl import URL

from downloader.devserver import DevServer
from downloader.netpolicy import BlockedAddressError, NetworkPolicy, TargetCheck
from downloader.proxy import ProxyRules, bypasses, redact
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, run_fetch
from tests.fwdproxy import ForwardProxy

SECRET = "s3cr3t-Pw"


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as running:
        yield running


# --- which URL goes through the proxy ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "expected"),
    [
        ("example.com", 80, ["*"], True),
        ("example.com", 80, ["example.com"], True),
        ("img.example.com", 80, ["example.com"], True),
        ("img.example.com", 80, [".example.com"], True),
        ("img.example.com", 80, ["*.example.com"], True),
        ("notexample.com", 80, ["example.com"], False),
        ("example.com", 80, ["img.example.com"], False),
        ("EXAMPLE.com.", 80, ["example.COM"], True),
        ("example.com", 8080, ["example.com:8080"], True),
        ("example.com", 80, ["example.com:8080"], False),
        ("10.1.2.3", 80, ["10.0.0.0/8"], True),
        ("10.1.2.3", 80, ["10.1.2.3"], True),
        ("10.1.2.4", 80, ["10.1.2.3"], False),
        ("::1", 80, ["::1"], True),
        ("::1", 80, ["[::1]:80"], True),
        ("::1", 443, ["[::1]:80"], False),
        ("2001:db8::5", 80, ["2001:db8::/32"], True),
        ("10.1.2.3", 80, ["example.com", "localhost"], False),
        ("localhost", 80, [], False),
    ],
)
def test_no_proxy_matching(host: str, port: int, no_proxy: list[str], expected: bool) -> None:
    assert bypasses(host, port, no_proxy) is expected


def test_proxies_from_the_environment_like_curl() -> None:
    env = {
        "HTTP_PROXY": "http://upper:3128",
        "http_proxy": "http://lower:3128",
        "HTTPS_PROXY": "tls-proxy:8080",
        "NO_PROXY": "localhost, .internal",
    }
    rules = ProxyRules.from_settings(None, None, env)
    assert rules.for_url(URL("http://a.com/x")).url == URL("http://lower:3128")  # type: ignore[union-attr]
    assert rules.for_url(URL("https://a.com/x")).url == URL("http://tls-proxy:8080")  # type: ignore[union-attr]
    assert rules.for_url(URL("http://img.internal/x")) is None
    assert rules.no_proxy == ("localhost", ".internal")
    every = ProxyRules.from_settings(None, None, {"ALL_PROXY": "http://all:1"})
    assert every.http == every.https and every.http is not None


def test_settings_override_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "*"}
    rules = ProxyRules.from_settings("http://u:p%40ss@conf:3128", ["a.com"], env)
    chosen = rules.for_url(URL("https://b.com/"))
    assert chosen is not None and chosen.url == URL("http://conf:3128")
    basic = base64.b64encode(b"u:p@ss").decode()
    assert chosen.headers == {"Proxy-Authorization": f"Basic {basic}"}
    assert "p%40ss" not in chosen.shown and "p@ss" not in chosen.shown
    assert rules.for_url(URL("https://a.com/")) is None
    assert ProxyRules.from_settings("", None, env).proxies == ()  # "" turns the env off


def test_other_proxy_schemes_are_refused_with_a_redacted_message() -> None:
    with pytest.raises(ValueError, match="socks5h://") as caught:
        ProxyRules.from_settings(None, None, {"ALL_PROXY": f"https://u:{SECRET}@h:3128"})
    assert SECRET not in str(caught.value)


def test_redact() -> None:
    assert redact(f"http://user:{SECRET}@proxy:3128") == "http://user:***@proxy:3128"
    assert redact("http://proxy:3128") == "http://proxy:3128"
    assert redact("not a url") == "not a url"


# --- the target check in front of the proxy ----------------------------------------


class _FakeResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[dict[str, Any]]:
        self.asked.append(host)
        return [{"host": a} for a in self.answers[host]]

    async def close(self) -> None:
        pass


def test_target_check_refuses_names_with_any_refused_address() -> None:
    resolver = _FakeResolver(
        {"good.test": ["93.184.216.34"], "mixed.test": ["93.184.216.34", "169.254.169.254"]}
    )
    check = TargetCheck(NetworkPolicy(), resolver, ttl=60)  # type: ignore[arg-type]

    async def scenario() -> None:
        await check.check("good.test")
        await check.check("good.test")
        with pytest.raises(BlockedAddressError, match=r"169\.254\.169\.254"):
            await check.check("mixed.test")
        with pytest.raises(BlockedAddressError):
            await check.check("10.0.0.1")

    asyncio.run(scenario())
    assert resolver.asked == ["good.test", "mixed.test"]  # cached; literals not resolved


# --- end to end, through a real proxy ----------------------------------------------


def test_run_goes_through_the_proxy(server: DevServer, proxy: ForwardProxy, tmp_path: Path) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(5)]
    with_password = proxy.url.replace("http://", f"http://imgdl:{SECRET}@")
    result, out = run_fetch(tmp_path, urls, HTTP_PROXY=with_password)
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}
    assert sorted(s.target for s in proxy.seen) == sorted(urls)
    assert all(s.proxy_authorization and s.method == "GET" for s in proxy.seen)
    assert len(server.requests) == 5
    assert SECRET not in result.stderr + (out / "manifest.jsonl").read_text()


def test_no_proxy_bypasses_the_proxy(
    server: DevServer, proxy: ForwardProxy, tmp_path: Path
) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(3)]
    result, out = run_fetch(tmp_path, urls, http_proxy=proxy.url, NO_PROXY="localhost,127.0.0.0/8")
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}
    assert proxy.seen == []
    assert len(server.requests) == 3


def test_blocked_target_never_reaches_the_proxy(
    server: DevServer, proxy: ForwardProxy, tmp_path: Path
) -> None:
    urls = [
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:10.0.0.1]/y.jpg",
        f"{server.url}/i/1.jpg",
    ]
    # The proxy (on loopback) is allowed, the targets in 10/8 and 169.254/16 are not.
    result, out = run_fetch(tmp_path, urls, HTTP_PROXY=proxy.url)
    records = {r["url"]: r for r in read_manifest(out)}
    assert [records[u]["reason"] for u in urls[:3]] == ["blocked_address"] * 3
    assert records[urls[3]]["status"] == "saved"
    assert [s.target for s in proxy.seen] == [urls[3]]
    assert result.returncode == 1


def test_proxy_address_must_be_allowed(
    server: DevServer, proxy: ForwardProxy, tmp_path: Path
) -> None:
    """A proxy on loopback with only the target's network allowed: refused, not used."""
    _, out = run_fetch(
        tmp_path,
        [f"{server.url}/i/1.jpg"],
        HTTP_PROXY=proxy.url.replace("127.0.0.1", "127.0.0.2"),
        IMGDL_NETWORK_ALLOW="127.0.0.1/32",
    )
    (record,) = read_manifest(out)
    assert record["reason"] == "blocked_address"
    assert "proxy http://127.0.0.2" in record["error"]
    assert server.requests == []


@pytest.fixture
def https_server() -> Iterator[tuple[DevServer, trustme.CA]]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with DevServer(ssl_context=context) as running:
        yield running, ca


def test_https_through_connect_with_credentials_never_shown(
    https_server: tuple[DevServer, trustme.CA], proxy: ForwardProxy, tmp_path: Path
) -> None:
    server, ca = https_server
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with_password = proxy.url.replace("http://", f"http://imgdl:{SECRET}@")
    urls = [f"{server.url}/i/{n}.jpg" for n in range(3)] + ["https://10.0.0.1/z.jpg"]
    env = {"HTTPS_PROXY": with_password, "IMGDL_TLS_CA_BUNDLE": str(bundle)}
    result, out = run_fetch(tmp_path, urls, **env)
    records = read_manifest(out)
    assert sorted(r["status"] for r in records) == ["failed", "saved", "saved", "saved"]
    port = URL(server.url).port
    assert [s.method for s in proxy.seen] == ["CONNECT"] * len(proxy.seen)
    assert {s.target for s in proxy.seen} == {f"127.0.0.1:{port}"}
    expected = "Basic " + base64.b64encode(f"imgdl:{SECRET}".encode()).decode()
    assert {s.proxy_authorization for s in proxy.seen} == {expected}
    shown = run_cli("config", "show", env=clean_env(**env))
    assert shown.returncode == 0, shown.stderr
    assert "imgdl:***@127.0.0.1" in shown.stdout
    explicit = run_cli("config", "show", env=clean_env(IMGDL_NETWORK_PROXY=with_password))
    assert "imgdl:***@127.0.0.1" in explicit.stdout
    everything = [result.stdout, result.stderr, shown.stdout, shown.stderr, explicit.stdout]
    everything += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    assert all(SECRET not in text for text in everything)
    assert read_summary(out)["by_reason"]["blocked_address"] == 1


def test_proxy_that_is_down_is_a_connection_error_without_password(
    server: DevServer, tmp_path: Path
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result, out = run_fetch(
        tmp_path,
        [f"{server.url}/i/1.jpg"],
        HTTP_PROXY=f"http://u:{SECRET}@127.0.0.1:{port}",
        IMGDL_RETRY_ATTEMPTS="1",
    )
    (record,) = read_manifest(out)
    assert record["reason"] == "connection_error"
    assert record["error"].startswith(f"proxy http://u:***@127.0.0.1:{port}: Cannot connect")
    assert SECRET not in result.stderr + (out / "manifest.jsonl").read_text()
    assert server.requests == []
