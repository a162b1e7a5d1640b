"""Width and height of an image from its header bytes, without decoding it.

The run report draws dimension histograms, so every saved record carries
``width``/``height``. Decoding with Pillow would cost milliseconds per image on
the hot path; the header of every format imgdl keeps states the size in its
first bytes, and the fetcher already holds those bytes (the body up to
``fetch.spool_bytes``, at least 64 KiB). So this reads only bytes already in
hand and never raises: anything it cannot read with certainty is ``None``.

Covered: PNG (IHDR), JPEG (the first SOFn marker, walking the segments before
it), GIF (logical screen), WebP (VP8, VP8L, VP8X), BMP (core and info
headers), TIFF (the first IFD, if it lies within the bytes given). Not covered:
AVIF/HEIC (the size sits in an ``ispe`` property that may belong to a
thumbnail) and SVG (a size in user units is no pixel count). The size is the
stored one: an EXIF orientation is not applied (Pillow's ``Image.size`` agrees).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Size = tuple[int, int]

#: Segments walked at most before a JPEG's frame header; real files have a few dozen.
_JPEG_MAX_STEPS = 512
#: SOF markers (C0-CF) that start a frame; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers that stand alone, without a length: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
#: TIFF IFD entries read at most.
_TIFF_MAX_ENTRIES = 1024


def image_size(kind: str, data: bytes) -> Size | None:
    """(width, height) of an image of type ``kind`` (``validate.ImageType.name``) whose
    first bytes are ``data``; None if the format or these bytes do not tell."""
    parser = _PARSERS.get(kind)
    if parser is None:
        return None
    try:
        size = parser(data)
    except (IndexError, ValueError, struct.error):  # a header cut short or nonsense
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png(data: bytes) -> Size | None:
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gif(data: bytes) -> Size | None:
    width, height = struct.unpack("<HH", data[6:10])
    return width, height


def _jpeg(data: bytes) -> Size | None:
    at = 2  # after SOI
    for _ in range(_JPEG_MAX_STEPS):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            return None
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            # length, precision (1 byte), height, width: a height of 0 comes later (DNL)
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None


def _webp(data: bytes) -> Size | None:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas, 24-bit little-endian, minus one
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14 + 14 bits, minus one
        if data[20] != 0x2F:
            return None
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":  # lossy: frame tag (3), start code (3), 14-bit sizes + scale
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _bmp(data: bytes) -> Size | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # BITMAPCOREHEADER: unsigned 16-bit
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    if header < 40:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)  # a negative height is a top-down bitmap


def _tiff(data: bytes) -> Size | None:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found: dict[int, int] = {}
    for n in range(min(count, _TIFF_MAX_ENTRIES)):
        entry = ifd + 2 + 12 * n
        tag, kind, values = struct.unpack(order + "HHI", data[entry : entry + 8])
        if tag in (256, 257) and values == 1:
            if kind == 3:  # SHORT, left-justified in the value field
                (found[tag],) = struct.unpack(order + "H", data[entry + 8 : entry + 10])
            elif kind == 4:  # LONG
                (found[tag],) = struct.unpack(order + "I", data[entry + 8 : entry + 12])
        if len(found) == 2:
            return found[256], found[257]
    return None


_PARSERS: dict[str, Callable[[bytes], Size | None]] = {
    "png": _png,
    "jpeg": _jpeg,
    "gif": _gif,
    "webp": _webp,
    "bmp": _bmp,
    "tiff": _tiff,
}
