"""What counts as an image: the real type, read from the first bytes.

The Content-Type header is only a claim; an HTML error page served as
``image/jpeg`` is common. We trust the magic bytes and name the file after them.
"""

from __future__ import annotations

import dataclasses

#: How many leading bytes :func:`sniff` needs to decide.
SNIFF_BYTES = 32


@dataclasses.dataclass(frozen=True, slots=True)
class ImageType:
    name: str
    mime: str
    ext: str


JPEG = ImageType("jpeg", "image/jpeg", ".jpg")
PNG = ImageType("png", "image/png", ".png")
GIF = ImageType("gif", "image/gif", ".gif")
WEBP = ImageType("webp", "image/webp", ".webp")
AVIF = ImageType("avif", "image/avif", ".avif")
HEIC = ImageType("heic", "image/heic", ".heic")
BMP = ImageType("bmp", "image/bmp", ".bmp")
TIFF = ImageType("tiff", "image/tiff", ".tif")

ALL_TYPES = (JPEG, PNG, GIF, WEBP, AVIF, HEIC, BMP, TIFF)
#: Every extension a saved image can have; used to find a file already on disk.
EXTENSIONS = tuple(t.ext for t in ALL_TYPES)
#: Extensions a user-given name may carry that we replace with the detected one.
KNOWN_SUFFIXES = frozenset(EXTENSIONS) | {".jpeg", ".jpe", ".tiff", ".heif", ".svg"}

_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff(head: bytes) -> ImageType | None:
    """The image type of a body starting with ``head``, or None if it is not one we keep."""
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return AVIF
        if brand in _HEIF_BRANDS:
            return HEIC
    if head[:2] == b"BM" and len(head) >= 14:
        return BMP
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return TIFF
    return None
