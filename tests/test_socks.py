"""SOCKS5 proxies (aiohttp-socks): socks5:// resolved here, socks5h:// by the proxy,
the network policy in front of both, NO_PROXY, the password hidden everywhere;
end to end through a real SOCKS5 server on 127.0.0.1 that records every CONNECT."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from yarl import URL

from downloader.devserver import DevServer
from downloader.proxy import Proxy, ProxyRules
from tests.conftest import clean_env, read_manifest, run_cli, run_fetch, write_list
from tests.socksserver import SocksServer

SECRET = "s0cks-Pw"
CREDENTIALS = ("imgdl", SECRET)


@pytest.fixture
def socks() -> Iterator[SocksServer]:
    with SocksServer(CREDENTIALS) as running:
        yield running


def _with_password(socks: SocksServer, scheme: str = "socks5") -> str:
    return socks.url(scheme).replace("://", f"://imgdl:{SECRET}@")


def _everything(result: Any, out: Path) -> str:
    files = [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()]
    return "\n".join([result.stdout, result.stderr, *files])


def test_socks_urls_are_parsed_with_the_password_apart() -> None:
    proxy = Proxy.parse(f"socks5h://imgdl:{SECRET}@proxy.internal")
    assert proxy.socks and proxy.remote_dns
    assert proxy.url == URL("socks5h://proxy.internal:1080")
    assert proxy.auth == CREDENTIALS and proxy.headers == {}
    assert SECRET not in proxy.shown + repr(proxy)
    rules = ProxyRules.from_settings(None, None, {"all_proxy": "socks5://h:9050"})
    chosen = rules.for_url(URL("https://a.com/"))
    assert chosen is not None and chosen.socks and not chosen.remote_dns


def test_socks4_and_others_are_refused_with_a_redacted_message() -> None:
    with pytest.raises(ValueError, match="socks5://") as caught:
        Proxy.parse(f"socks4://u:{SECRET}@h:1080")
    assert SECRET not in str(caught.value)


def test_without_the_library_a_socks_url_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiohttp_socks", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'imgdl\[socks\]'") as caught:
        Proxy.parse(f"socks5://u:{SECRET}@h:1080")
    assert SECRET not in str(caught.value)


def test_cli_without_the_library_exits_2(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['aiohttp_socks'] = None\n", encoding="utf-8"
    )
    listing = write_list(tmp_path / "u.txt", ["http://127.0.0.1:9/x.jpg"])
    for env in (
        {"all_proxy": f"socks5://u:{SECRET}@127.0.0.1:1080"},
        {"IMGDL_NETWORK_PROXY": f"socks5h://u:{SECRET}@127.0.0.1:1080"},
    ):
        result = run_cli(
            "fetch",
            str(listing),
            "-o",
            str(tmp_path / "out"),
            env=clean_env(PYTHONPATH=str(tmp_path), **env),
        )
        assert result.returncode == 2, result.stderr
        assert "pip install 'imgdl[socks]'" in result.stderr
        assert SECRET not in result.stdout + result.stderr


def test_run_through_socks5_resolves_here(
    server: DevServer, socks: SocksServer, tmp_path: Path
) -> None:
    port = URL(server.url).port
    urls = [f"http://localhost:{port}/i/{n}.jpg" for n in range(5)]
    result, out = run_fetch(tmp_path, urls, all_proxy=_with_password(socks))
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}
    assert len(server.requests) == 5
    assert 1 <= len(socks.seen) <= 5  # connections, kept alive from request to request
    # socks5://: imgdl resolved localhost and sent the proxy an address
    assert {(c.host, c.port, c.by_name) for c in socks.seen} <= {
        ("127.0.0.1", port, False),
        ("::1", port, False),
    }
    assert {c.username for c in socks.seen} == {"imgdl"}
    assert SECRET not in _everything(result, out)
    shown = run_cli("config", "show", env=clean_env(all_proxy=_with_password(socks)))
    assert shown.returncode == 0, shown.stderr
    assert "imgdl:***@127.0.0.1" in shown.stdout and SECRET not in shown.stdout + shown.stderr


def test_run_through_socks5h_lets_the_proxy_resolve(
    server: DevServer, socks: SocksServer, tmp_path: Path
) -> None:
    port = URL(server.url).port
    urls = [f"http://localhost:{port}/i/{n}.jpg" for n in range(3)]
    result, out = run_fetch(tmp_path, urls, IMGDL_NETWORK_PROXY=_with_password(socks, "socks5h"))
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}
    assert socks.seen and {(c.host, c.by_name) for c in socks.seen} == {("localhost", True)}
    assert SECRET not in _everything(result, out)


def test_no_proxy_bypasses_socks(server: DevServer, socks: SocksServer, tmp_path: Path) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(3)]
    result, out = run_fetch(tmp_path, urls, ALL_PROXY=_with_password(socks), NO_PROXY="127.0.0.0/8")
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}
    assert socks.seen == []
    assert len(server.requests) == 3


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_blocked_target_never_reaches_socks(
    scheme: str, server: DevServer, socks: SocksServer, tmp_path: Path
) -> None:
    urls = ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/", f"{server.url}/i/1.jpg"]
    result, out = run_fetch(tmp_path, urls, all_proxy=_with_password(socks, scheme))
    records = {r["url"]: r for r in read_manifest(out)}
    assert [records[u]["reason"] for u in urls[:2]] == ["blocked_address"] * 2
    assert records[urls[2]]["status"] == "saved"
    assert [c.host for c in socks.seen] == ["127.0.0.1"]
    assert result.returncode == 1
    assert SECRET not in _everything(result, out)


def test_socks_address_must_be_allowed(
    server: DevServer, socks: SocksServer, tmp_path: Path
) -> None:
    _, out = run_fetch(
        tmp_path,
        [f"{server.url}/i/1.jpg"],
        all_proxy=_with_password(socks).replace("127.0.0.1", "127.0.0.2"),
        IMGDL_NETWORK_ALLOW="127.0.0.1/32",
    )
    (record,) = read_manifest(out)
    assert record["reason"] == "blocked_address"
    assert "proxy socks5://imgdl:***@127.0.0.2" in record["error"]
    assert socks.seen == [] and server.requests == []


def test_wrong_password_is_a_connection_error_without_it(
    server: DevServer, socks: SocksServer, tmp_path: Path
) -> None:
    wrong = socks.url().replace("://", "://imgdl:not-it@")
    _, out = run_fetch(
        tmp_path, [f"{server.url}/i/1.jpg"], all_proxy=wrong, IMGDL_RETRY_ATTEMPTS="1"
    )
    (record,) = read_manifest(out)
    assert record["reason"] == "connection_error", record
    assert record["error"].startswith(f"proxy socks5://imgdl:***@127.0.0.1:{socks.port}: ")
    assert "not-it" not in record["error"]
    assert socks.refused_auth == 1 and server.requests == []


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_https_by_name_through_socks(scheme: str, socks: SocksServer, tmp_path: Path) -> None:
    """socks5:// sends the proxy an address, yet TLS checks the certificate for the name."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with DevServer(ssl_context=context) as server:
        port = URL(server.url).port
        urls = [f"https://localhost:{port}/i/{n}.jpg" for n in range(3)]
        env = {"HTTPS_PROXY": _with_password(socks, scheme), "IMGDL_TLS_CA_BUNDLE": str(bundle)}
        result, out = run_fetch(tmp_path, urls, **env)
        assert result.returncode == 0, result.stderr
        assert {r["status"] for r in read_manifest(out)} == {"saved"}
        assert len(server.requests) == 3
    assert socks.seen and all(c.by_name is (scheme == "socks5h") for c in socks.seen)
    assert SECRET not in _everything(result, out)


def test_socks_without_credentials(server: DevServer, tmp_path: Path) -> None:
    with SocksServer() as open_socks:
        urls = [f"{server.url}/i/{n}.jpg" for n in range(2)]
        result, out = run_fetch(tmp_path, urls, all_proxy=open_socks.url())
        assert result.returncode == 0, result.stderr
        assert {r["status"] for r in read_manifest(out)} == {"saved"}
        assert open_socks.seen and {c.username for c in open_socks.seen} == {None}
