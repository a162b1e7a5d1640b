"""TLS: verification on by default, a private CA by configuration, off only when asked."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from downloader.devserver import DevServer
from tests.conftest import clean_env, read_manifest, run_cli, write_list


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https_server(ca: trustme.CA) -> Iterator[DevServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with DevServer(ssl_context=context) as server:
        yield server


def test_self_signed_is_refused_by_default(https_server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{https_server.url}/i/1.jpg"])
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    (record,) = read_manifest(tmp_path / "out")
    assert record["reason"] == "tls_error"
    assert "certificate" in record["error"].lower()
    assert record["attempts"] == 1  # a certificate does not get better by retrying


def test_accepted_with_the_ca_bundle(
    https_server: DevServer, ca: trustme.CA, tmp_path: Path
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    listing = write_list(tmp_path / "u.txt", [f"{https_server.url}/i/{n}.jpg" for n in range(3)])
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), env=clean_env(IMGDL_TLS_CA_BUNDLE=str(bundle))
    )
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in read_manifest(out)} == {"saved"}


def test_verification_off_warns(https_server: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{https_server.url}/i/1.jpg"])
    result = run_cli(
        "fetch", str(listing), "-o", str(tmp_path / "out"), env=clean_env(IMGDL_TLS_VERIFY="false")
    )
    assert result.returncode == 0, result.stderr
    assert "TLS verification is OFF" in result.stderr


def test_missing_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli(
        "fetch",
        "-",
        "-o",
        str(tmp_path / "out"),
        stdin=b"",
        env=clean_env(IMGDL_TLS_CA_BUNDLE=str(tmp_path / "nope.pem")),
    )
    assert result.returncode == 2
    assert "tls.ca_bundle" in result.stderr
