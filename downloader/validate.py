"""What counts as an image: the real type from the first bytes, and optionally a decode.

The Content-Type header is only a claim; an HTML error page served as
``image/jpeg`` is common. We trust the magic bytes and name the file after them.
SVG is refused unless ``validate.allow_svg``: it is a script carrier. With
``validate.decode`` the whole file is decoded with Pillow (off the event loop)
behind a pixel-count guard, and width/height filters apply.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from downloader.errors import ConfigError
from downloader.outcomes import Reason
from downloader.settings import ValidateSettings

#: Leading bytes :func:`sniff` needs for binary formats; text (SVG) needs more.
SNIFF_BYTES = 32
SNIFF_TEXT_BYTES = 1024


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
SVG = ImageType("svg", "image/svg+xml", ".svg")

ALL_TYPES = (JPEG, PNG, GIF, WEBP, AVIF, HEIC, BMP, TIFF, SVG)
#: Every extension a saved image can have; used to find a file already on disk.
EXTENSIONS = tuple(t.ext for t in ALL_TYPES)
#: Extensions a user-given name may carry that we replace with the detected one.
KNOWN_SUFFIXES = frozenset(EXTENSIONS) | {".jpeg", ".jpe", ".tiff", ".heif"}

_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def _bounds(width: int, height: int) -> str:
    """A size filter as messages show it: 0 means there is none on that side."""
    return ", ".join(
        f"{name} {n}" if n else f"any {name}" for name, n in (("width", width), ("height", height))
    )


class InvalidImage(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sniff_needs(head: bytes) -> int:
    """How many leading bytes :func:`sniff` wants for a body starting with ``head``."""
    return SNIFF_TEXT_BYTES if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<" else SNIFF_BYTES


def sniff(head: bytes) -> ImageType | None:
    """The image type of a body starting with ``head``, or None if it is not one we know."""
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
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith((b"<svg", b"<?xml", b"<!DOCTYPE svg")) and b"<svg" in head:
        return SVG
    return None


def accept(image: ImageType | None, settings: ValidateSettings) -> ImageType:
    """The type if it is one we keep; raises InvalidImage otherwise."""
    if image is None:
        raise InvalidImage(Reason.NOT_AN_IMAGE, "body is not a known image format")
    if image is SVG and not settings.allow_svg:
        raise InvalidImage(
            Reason.NOT_AN_IMAGE, "SVG is refused (it can carry scripts); validate.allow_svg: true"
        )
    return image


def require_pillow(settings: ValidateSettings) -> None:
    """Fail at start, not per image, when decoding is asked for without Pillow."""
    if settings.decode:
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ConfigError("validate.decode needs Pillow: pip install 'imgdl[decode]'") from None


def check_decoded(path: Path, image: ImageType, settings: ValidateSettings) -> None:
    """Decode the file fully (blocking: run it in a thread); raise InvalidImage if it fails."""
    if image is SVG:
        return  # Pillow does not render SVG; it was let through on purpose
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own guard below, with our own reason
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > settings.max_pixels:
                raise InvalidImage(
                    Reason.DECOMPRESSION_BOMB,
                    f"{width}x{height} pixels is more than validate.max_pixels "
                    f"{settings.max_pixels}",
                )
            if width < settings.min_width or height < settings.min_height:
                raise InvalidImage(
                    Reason.TOO_SMALL,
                    f"{width}x{height} is below the minimum "
                    + _bounds(settings.min_width, settings.min_height),
                )
            if (settings.max_width and width > settings.max_width) or (
                settings.max_height and height > settings.max_height
            ):
                raise InvalidImage(
                    Reason.TOO_BIG,
                    f"{width}x{height} is above the maximum "
                    + _bounds(settings.max_width, settings.max_height),
                )
            img.load()
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise InvalidImage(Reason.DECODE_ERROR, f"cannot decode: {exc}") from None
