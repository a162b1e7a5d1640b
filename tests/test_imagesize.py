"""Width and height from header bytes, checked against Pillow on files Pillow writes."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from downloader.devserver import DEFAULT_IMAGES
from downloader.imagesize import image_size
from downloader.validate import sniff


def _encode(size: tuple[int, int], fmt: str, mode: str = "RGB", **options: object) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 90) if mode == "RGB" else 0).save(out, fmt, **options)
    return out.getvalue()


def _exif_app1(payload: int) -> bytes:
    """An APP1 segment of ``payload`` bytes: what a camera puts before the frame header."""
    return b"\xff\xe1" + struct.pack(">H", payload + 2) + b"Exif\x00\x00" + bytes(payload - 6)


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("PNG", "RGB", {}),
        ("JPEG", "RGB", {}),
        ("JPEG", "RGB", {"progressive": True}),
        ("JPEG", "L", {}),
        ("GIF", "P", {}),
        ("WEBP", "RGB", {"lossless": False}),
        ("WEBP", "RGB", {"lossless": True}),
        ("WEBP", "RGBA", {"lossless": False}),  # alpha: the extended (VP8X) header
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    ],
)
@pytest.mark.parametrize("size", [(1, 1), (317, 45), (4000, 3)])
def test_size_matches_pillow(
    fmt: str, mode: str, options: dict[str, object], size: tuple[int, int]
) -> None:
    data = _encode(size, fmt, mode, **options)
    kind = sniff(data[:32])
    assert kind is not None
    assert image_size(kind.name, data) == size


def test_big_endian_tiff_and_top_down_bmp() -> None:
    # Pillow writes little-endian TIFF only: a big-endian header by hand, width a
    # SHORT (left-justified in its value field), height a LONG.
    entries = struct.pack(">HHIHH", 256, 3, 1, 300, 0) + struct.pack(">HHII", 257, 4, 1, 20)
    big = b"MM\x00*" + struct.pack(">IH", 8, 2) + entries + bytes(4)
    assert image_size("tiff", big) == (300, 20)
    assert image_size("tiff", big[:20]) is None  # the IFD cut short
    bmp = bytearray(_encode((64, 48), "BMP"))
    bmp[22:26] = struct.pack("<i", -48)  # a negative height: rows stored top-down
    assert image_size("bmp", bytes(bmp)) == (64, 48)


def test_jpeg_behind_a_large_exif_segment() -> None:
    plain = _encode((640, 480), "JPEG")
    with_exif = plain[:2] + _exif_app1(60_000) + plain[2:]
    assert image_size("jpeg", with_exif) == (640, 480)
    # The frame header lies beyond the bytes in hand: unknown, not a guess.
    assert image_size("jpeg", with_exif[:30_000]) is None


def test_every_sample_image_matches_pillow() -> None:
    for path in sorted(DEFAULT_IMAGES.iterdir()):
        data = path.read_bytes()
        kind = sniff(data[:32])
        assert kind is not None, path
        with Image.open(path) as img:
            assert image_size(kind.name, data) == img.size, path


@pytest.mark.parametrize("kind", ["avif", "heic", "svg", "unknown"])
def test_formats_without_a_reader_are_unknown(kind: str) -> None:
    assert image_size(kind, b"\x00\x00\x00\x1cftypavif" + bytes(100)) is None


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_cut_headers_are_unknown_not_errors(fmt: str) -> None:
    data = _encode((50, 60), fmt, "P" if fmt == "GIF" else "RGB")
    kind = sniff(data[:32])
    assert kind is not None
    for cut in range(0, 40):
        assert image_size(kind.name, data[:cut]) in (None, (50, 60))


@given(
    st.sampled_from(["png", "jpeg", "gif", "webp", "bmp", "tiff"]),
    st.sampled_from(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM", b"II*\0"]
    ),
    st.binary(max_size=300),
)
def test_garbage_never_raises(kind: str, magic: bytes, rest: bytes) -> None:
    size = image_size(kind, magic + rest)
    assert size is None or (size[0] > 0 and size[1] > 0)
