"""TLS: verification on by default, a private CA by configuration, off only when asked."""

from __future__ import annotations

import ssl
import subprocess
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
    assert "tls.ca_bundle" in record["error"]  # what to do about a private CA
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


def _hashed_folder(ca: trustme.CA, folder: Path) -> Path:
    """A CA folder as OpenSSL reads one: the PEM, and its subject-hash link (openssl rehash)."""
    folder.mkdir()
    ca.cert_pem.write_to_path(str(folder / "test-ca.pem"))
    subprocess.run(["openssl", "rehash", str(folder)], check=True, capture_output=True)
    assert any(p.name.endswith(".0") for p in folder.iterdir())
    return folder


def _fetch_three(server: DevServer, tmp_path: Path, **env: str) -> list[dict[str, object]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.jpg" for n in range(3)])
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), env=clean_env(**env))
    assert result.returncode in (0, 1), result.stderr
    return read_manifest(out)


def test_a_ca_folder_as_the_bundle(https_server: DevServer, ca: trustme.CA, tmp_path: Path) -> None:
    folder = _hashed_folder(ca, tmp_path / "cas")
    records = _fetch_three(https_server, tmp_path, IMGDL_TLS_CA_BUNDLE=str(folder))
    assert {r["status"] for r in records} == {"saved"}


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_openssl_variables_are_the_trust_store(
    https_server: DevServer, ca: trustme.CA, tmp_path: Path, variable: str
) -> None:
    """SSL_CERT_FILE / SSL_CERT_DIR replace the system's trust store, as for curl and
    OpenSSL: a private CA given there is trusted; without it, the same run is refused."""
    folder = _hashed_folder(ca, tmp_path / "cas")
    value = str(folder / "test-ca.pem") if variable == "SSL_CERT_FILE" else str(folder)
    other = "SSL_CERT_DIR" if variable == "SSL_CERT_FILE" else "SSL_CERT_FILE"
    empty = tmp_path / "empty"
    empty.mkdir()
    # the other variable points at nothing useful, so only ``variable`` can help
    blank = str(empty) if other == "SSL_CERT_DIR" else str(empty / "none.pem")
    trusted = _fetch_three(https_server, tmp_path / "a", **{variable: value, other: blank})
    assert {r["status"] for r in trusted} == {"saved"}
    refused = _fetch_three(https_server, tmp_path / "b", **{other: blank, variable: blank})
    assert {r["reason"] for r in refused} == {"tls_error"}


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
