"""The network policy: unit checks, and end to end in a network namespace of its own."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from downloader.devserver import DevServer
from downloader.netpolicy import BlockedAddressError, NetworkPolicy, parse_host
from tests.conftest import clean_env, read_manifest, run_cli, run_in_namespace, write_list


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[::ffff:a9fe:a9fe]",
        "2852039166",
        "0xa9fea9fe",
        "0251.0376.0251.0376",
        "169.254.43518",
        "127.0.0.1",
        "127.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "[2002:a9fe:a9fe::1]",
        "64:ff9b::a9fe:a9fe",
        "255.255.255.255",
    ],
)
def test_non_global_addresses_are_refused(host: str) -> None:
    with pytest.raises(BlockedAddressError):
        NetworkPolicy().check_host(host)


@pytest.mark.parametrize("host", ["93.184.216.34", "2606:2800:220:1::1", "example.com"])
def test_public_addresses_and_names_pass_the_literal_check(host: str) -> None:
    NetworkPolicy().check_host(host)  # names are checked by the resolver instead


def test_allow_list_opens_exactly_what_it_names() -> None:
    policy = NetworkPolicy.from_strings(["127.0.0.0/8"])
    assert policy.refuses(ipaddress.ip_address("127.0.0.2")) is None
    assert policy.refuses(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.refuses(ipaddress.ip_address("169.254.169.254"))
    assert policy.refuses(ipaddress.ip_address("::1"))


def test_parse_host_spellings() -> None:
    assert parse_host("2852039166") == ipaddress.IPv4Address("169.254.169.254")
    assert parse_host("[fe80::1%eth0]") == ipaddress.IPv6Address("fe80::1")
    assert parse_host("images.example.com") is None


def test_loopback_is_refused_by_default(server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/1.jpg"])
    env = {k: v for k, v in clean_env().items() if k != "IMGDL_NETWORK_ALLOW"}
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 1
    (record,) = read_manifest(tmp_path / "out")
    assert record["reason"] == "blocked_address"
    assert "network.allow" in record["error"]
    assert server.requests == []  # refused before any connection


def test_redirects_are_capped_and_checked(server: DevServer, tmp_path: Path) -> None:
    urls = {
        "loop": f"{server.url}/loop/1",
        "ftp": f"{server.url}/redirect?to=ftp://example.com/a.jpg",
        "ok": f"{server.url}/redirect?to={server.url}/i/4.jpg",
    }
    listing = write_list(tmp_path / "u.txt", list(urls.values()))
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    by_url = {r["url"]: r for r in read_manifest(tmp_path / "out")}
    assert by_url[urls["loop"]]["reason"] == "too_many_redirects"
    assert sum(1 for _, _, p in server.requests if p == "/loop/1") == 6  # first + 5 hops
    assert by_url[urls["ftp"]]["reason"] == "protocol_error"
    assert by_url[urls["ftp"]]["attempts"] == 1  # it would be refused again: no retry
    assert by_url[urls["ok"]]["status"] == "saved"
    assert by_url[urls["ok"]]["final_url"] == f"{server.url}/i/4.jpg"


def test_metadata_is_never_reached_in_a_namespace_of_its_own() -> None:
    result = run_in_namespace("netns_scenario.py")
    assert result["metadata_connections"] == 0, result
    outcomes = result["outcomes"]
    assert outcomes.pop("allowed")[0] is None  # saved: the guard lets allowed traffic through
    for name, (reason, error) in outcomes.items():
        assert reason == "blocked_address", (name, reason, error)
    assert "Traceback" not in result["stderr_tail"]
