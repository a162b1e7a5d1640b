"""Hostile servers and hostile lists: every case ends in a recorded outcome, no traceback.

One run over a list that mixes every hostile case (so that they also meet each
other in one pool), then the cases that need settings of their own.
"""

from __future__ import annotations

import io
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from PIL import Image

from downloader.devserver import DevServer
from downloader.proctree import descendants, rss_kib
from tests.conftest import clean_env, image_files, read_manifest, run_cli, start_cli, write_list
from tests.rawserver import RawServer


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


BODIES = {
    "json-as-jpeg": (b'{"error": "not found"}\n' + b" " * 64, "image/jpeg"),
    "svg": (
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
        b'onload="alert(1)"><rect width="10" height="10"/></svg>\n',
        "image/svg+xml",
    ),
    "corrupt-jpeg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8, "image/jpeg"),
    "bomb-png": (_png_claiming(100_000, 100_000), "image/png"),
    "tiny": (_png(4, 4), "image/png"),
    "wide": (_png(300, 20), "image/png"),
    "fine": (_png(64, 64), "image/png"),
}


@pytest.fixture
def hostile() -> Iterator[DevServer]:
    with DevServer(bodies=BODIES) as server:
        yield server


@pytest.fixture
def garbage() -> Iterator[dict[str, RawServer]]:
    servers = {
        "bad_status": RawServer(b"HTTP/1.1 abc nonsense\r\n\r\n"),
        "huge_header": RawServer(b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 100_000 + b"\r\n\r\n"),
        "reset_in_headers": RawServer(b"HTTP/1.1 200 OK\r\nContent-Ty", reset=True),
        "not_http": RawServer(b"SSH-2.0-OpenSSH_9.0\r\n"),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.mark.parametrize("client", ["builtin", "aiohttp"])
def test_every_hostile_case_has_its_reason(
    hostile: DevServer, garbage: dict[str, RawServer], tmp_path: Path, client: str
) -> None:
    """Both HTTP clients (http.client) give every case the same reason."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with DevServer(ssl_context=context) as tls:
        cases = {
            "html_as_jpeg": (f"{hostile.url}/html/1", "not_an_image"),
            "json_as_jpeg": (f"{hostile.url}/body/json-as-jpeg", "not_an_image"),
            "svg_refused": (f"{hostile.url}/body/svg", "not_an_image"),
            "gzip_bomb": (f"{hostile.url}/bomb/1", "too_large"),
            "endless_body": (f"{hostile.url}/huge/1", "too_large"),
            "declared_huge": (f"{hostile.url}/declared-huge/1", "too_large"),
            "lies_about_length": (f"{hostile.url}/truncated/1", "truncated"),
            "redirect_loop": (f"{hostile.url}/loop/1", "too_many_redirects"),
            "redirect_to_ftp": (
                f"{hostile.url}/redirect?to=ftp://x.example/a.jpg",
                "protocol_error",
            ),
            "redirect_to_metadata": (
                f"{hostile.url}/redirect?to=http://169.254.169.254/latest/",
                "blocked_address",
            ),
            "self_signed_tls": (f"{tls.url}/i/1.jpg", "tls_error"),
            **{
                name: (f"http://127.0.0.1:{srv.port}/x.jpg", "protocol_error")
                for name, srv in garbage.items()
            },
            "fine": (f"{hostile.url}/i/4.jpg", None),
        }
        listing = write_list(tmp_path / "u.txt", [url for url, _ in cases.values()])
        out = tmp_path / "out"
        started = time.monotonic()
        result = run_cli(
            "fetch",
            str(listing),
            "-o",
            str(out),
            "--processes",
            "2",
            "--shard-size",
            "4",
            "--tries",
            "1",
            timeout=120,
            env=clean_env(IMGDL_HTTP_CLIENT=client),
        )
        took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    by_url = {r["url"]: r for r in read_manifest(out)}
    got = {name: by_url[url]["reason"] for name, (url, _) in cases.items()}
    assert got == {name: reason for name, (_, reason) in cases.items()}
    assert len(image_files(out)) == 1
    assert not list(out.rglob("*.part"))
    assert took < 60


def test_names_cannot_escape_outdir(hostile: DevServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "planted").symlink_to(elsewhere, target_is_directory=True)
    (out / "linked.png").symlink_to("/etc/hostname")  # a file link where an image would go
    names = {
        "climb": "../../evil",
        "absolute": "/etc/evil",
        "control": "a\x01b",
        "device": "sub/CON",
        "long": "x" * 300,
        "state_dir": ".imgdl/parts/evil",
        "planted_symlink": "planted/evil",
        "trailing_dot": "evil.",
        "planted_file_link": "linked",
    }
    rows = "".join(f'{hostile.url}/i/{n}.jpg,"{name}"\n' for n, name in enumerate(names.values()))
    listing = tmp_path / "n.csv"
    listing.write_text("url,name\n" + rows + f"{hostile.url}/i/20.jpg,fine/ok\n")
    result = run_cli("fetch", str(listing), "-o", str(out), "--name-column", "name")
    assert result.returncode == 1
    records = {r["line"]: r for r in read_manifest(out)}
    for line, name in enumerate(names, start=2):
        assert records[line]["reason"] == "invalid_name", (name, records[line])
    assert records[len(names) + 2]["status"] == "saved"
    assert list(elsewhere.iterdir()) == []
    assert not list(tmp_path.glob("evil*")) and not Path("/etc/evil.jpg").exists()


def test_decoding_catches_what_magic_bytes_cannot(hostile: DevServer, tmp_path: Path) -> None:
    cases = {
        "corrupt-jpeg": "decode_error",
        "bomb-png": "decompression_bomb",
        "tiny": "too_small",
        "wide": "too_big",
        "fine": None,
    }
    listing = write_list(tmp_path / "u.txt", [f"{hostile.url}/body/{n}" for n in cases])
    config = tmp_path / "v.yaml"
    config.write_text(
        "validate:\n  decode: true\n  min_width: 10\n  min_height: 10\n  max_width: 200\n"
    )
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), "--config", str(config))
    assert result.returncode == 1, result.stderr
    records = {r["url"].rsplit("/", 1)[1]: r for r in read_manifest(out)}
    assert {name: r["reason"] for name, r in records.items()} == cases
    # a bound that is not set (0) reads as none, not as 0
    assert records["wide"]["error"].endswith("is above the maximum width 200, any height")
    assert "is below the minimum width 10, height 10" in records["tiny"]["error"]
    assert [p.suffix for p in image_files(out)] == [".png"]


def test_svg_kept_when_allowed(hostile: DevServer, tmp_path: Path) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{hostile.url}/body/svg"])
    out = tmp_path / "out"
    result = run_cli(
        "fetch", str(listing), "-o", str(out), env=clean_env(IMGDL_VALIDATE_ALLOW_SVG="true")
    )
    assert result.returncode == 0, result.stderr
    assert read_manifest(out)[0]["path"].endswith(".svg")


@pytest.mark.slow
@pytest.mark.parametrize("route", ["bomb", "huge"])
def test_memory_stays_flat_on_a_one_gigabyte_body(
    hostile: DevServer, tmp_path: Path, route: str
) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{hostile.url}/{route}/{n}" for n in range(2)])
    out = tmp_path / "out"
    proc = start_cli(
        "fetch",
        str(listing),
        "-o",
        str(out),
        "--tries",
        "1",
        env=clean_env(IMGDL_VALIDATE_MAX_BYTES=str(1 << 30)),  # the cap far away: 1 GiB
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max([peak] + [rss_kib(p) for p in descendants(proc.pid)])
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc.wait(180)
    finally:
        stop.set()
        proc.kill()
    assert proc.returncode == 1
    assert {r["reason"] for r in read_manifest(out)} == {"too_large"}
    assert peak < 200 * 1024, f"peak RSS of one process {peak // 1024} MiB"
