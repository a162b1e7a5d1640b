"""Resize and re-encode an image before it is stored, and its perceptual hash.

Dataset builders want every image at one size and in one format (image.*): the
modes are img2dataset's (``keep_ratio``, ``center_crop``, ``border``), done with
Pillow. Everything here is blocking and CPU-bound, so the fetcher runs it in a
thread pool of ``image.workers`` threads per worker process (:func:`run`):
Pillow releases the GIL while it decodes, resamples and encodes, so the event
loop keeps downloads flowing meanwhile.

What the stored image looks like, whatever came in:

- EXIF orientation applied (``ImageOps.exif_transpose``), so a phone photo is
  upright without its metadata;
- one of the modes L, RGB (and RGBA for PNG and WebP): palettes with
  transparency, LA/RGBA (composited on white for JPEG, as img2dataset does),
  CMYK, 1-bit and 16-bit greyscale are converted;
- the first frame of an animation.

The decode is guarded by ``validate.max_pixels`` (read from the header, before
any pixel is decoded): a larger image is ``decompression_bomb``; any other
failure to decode is ``decode_error``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import operator
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from downloader.outcomes import Reason
from downloader.validate import JPEG, PNG, SVG, WEBP, ImageType, InvalidImage

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from downloader.settings import Settings

#: Output formats: setting value → (Pillow's format name, the stored type).
_FORMATS = {"jpeg": ("JPEG", JPEG), "webp": ("WEBP", WEBP), "png": ("PNG", PNG)}
_KEEPABLE = {JPEG.name: "jpeg", WEBP.name: "webp", PNG.name: "png"}
_ALPHA_FORMATS = frozenset({"PNG", "WEBP"})
_WHITE = 255
#: EXIF orientations that swap width and height (transposes and 90° turns).
_SWAPPING = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass(frozen=True, slots=True)
class Transform:
    """What to do to each image: a frozen value built once per worker from settings."""

    mode: str = "no"
    size: int = 256
    format: str = "keep"
    quality: int = 95
    max_pixels: int = 89_478_485
    #: compute the 64-bit pHash too (dedupe.content: perceptual)
    phash: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Transform | None:
        """None when images are stored as downloaded and no pHash is wanted."""
        image = settings.image
        made = cls(
            mode=image.resize_mode,
            size=image.size,
            format=image.format,
            quality=image.quality,
            max_pixels=settings.validate_.max_pixels,
            phash=settings.dedupe.content == "perceptual",
        )
        return made if made.reencodes or made.phash else None

    @property
    def reencodes(self) -> bool:
        return self.mode != "no" or self.format != "keep"

    def applies_to(self, image: ImageType) -> bool:
        """SVG is not a raster image: it is kept as it came (when allowed at all)."""
        return image is not SVG


@dataclasses.dataclass(frozen=True, slots=True)
class Processed:
    """The result of :func:`process`: new bytes (or None: keep the downloaded ones)."""

    body: bytes | None
    image: ImageType
    width: int
    height: int
    original_width: int
    original_height: int
    phash: int | None = None


def require_pillow(settings: Settings) -> None:
    """Fail at start, not per image, when image.* or perceptual dedupe lacks Pillow."""
    if Transform.from_settings(settings) is None:
        return
    try:
        import PIL  # noqa: F401
    except ImportError:
        from downloader.errors import ConfigError

        raise ConfigError(
            "image.resize_mode, image.format and dedupe.content: perceptual need Pillow: "
            "pip install 'imgdl[dataset]'"
        ) from None


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool(workers: int) -> ThreadPoolExecutor:
    """The process's image threads: made by the first image, kept from shard to shard."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgdl-image")
        return _pool


def process(source: bytes | Path, image: ImageType, transform: Transform) -> Processed:
    """Decode, orient, resize, normalise, encode (blocking: run it in :func:`pool`).

    Raises InvalidImage (decompression_bomb, decode_error); never anything else.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own guard, with our own reason
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return _process(img, image, transform)
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise InvalidImage(Reason.DECODE_ERROR, f"cannot decode: {exc}") from None


def _process(img: PILImage.Image, image: ImageType, transform: Transform) -> Processed:
    from PIL import ImageOps

    raw_w, raw_h = img.size
    if raw_w * raw_h > transform.max_pixels:
        raise InvalidImage(
            Reason.DECOMPRESSION_BOMB,
            f"{raw_w}x{raw_h} pixels is more than validate.max_pixels {transform.max_pixels}",
        )
    orientation = img.getexif().get(_ORIENTATION_TAG)
    original = (raw_h, raw_w) if orientation in _SWAPPING else (raw_w, raw_h)
    target = _target(raw_w, raw_h, transform)
    if target is not None and target[0] * target[1] > transform.max_pixels:
        # a thin image (1x6000 pixels in 107 bytes) enlarged to image.size would be a
        # bomb of our own making: 256x1,536,000 pixels
        raise InvalidImage(
            Reason.DECOMPRESSION_BOMB,
            f"{raw_w}x{raw_h} pixels resized to {target[0]}x{target[1]} is more than "
            f"validate.max_pixels {transform.max_pixels}",
        )
    wanted = target
    if wanted is None and not transform.reencodes:  # the pHash alone: 32x32 is enough
        wanted = (2 * _PHASH_SIDE, 2 * _PHASH_SIDE)
    if img.format == "JPEG" and wanted is not None:
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that is still at least the
        # size needed: most of the cost of shrinking a large JPEG saved (Pillow's
        # thumbnail() does the same). The scale is symmetric, so rotation is no matter.
        img.draft(img.mode, wanted)
    ImageOps.exif_transpose(img, in_place=True)
    img.load()
    work: PILImage.Image = img
    phash = perceptual_hash(work) if transform.phash else None
    if not transform.reencodes:
        return Processed(None, image, *original, *original, phash=phash)
    name, stored = _output(image, transform)
    work = _normalise(work, alpha=name in _ALPHA_FORMATS)
    if target is not None:
        work = _resize(work, transform)
    out = io.BytesIO()
    if name == "PNG":
        work.save(out, name)
    else:
        work.save(out, name, quality=transform.quality)
    return Processed(out.getvalue(), stored, *work.size, *original, phash=phash)


def _target(width: int, height: int, transform: Transform) -> tuple[int, int] | None:
    """The size the image is resampled to before any crop or pad; None: unchanged."""
    if transform.mode == "no":
        return None
    side = min(width, height) if transform.mode != "border" else max(width, height)
    scale = transform.size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _output(image: ImageType, transform: Transform) -> tuple[str, ImageType]:
    chosen = transform.format
    if chosen == "keep":
        chosen = _KEEPABLE.get(image.name, "jpeg")
    return _FORMATS[chosen]


def _normalise(img: PILImage.Image, alpha: bool) -> PILImage.Image:
    """One of L, RGB, RGBA (RGBA only if the format keeps alpha, else composited on
    white, as img2dataset does)."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (or 32-bit) greyscale: scale to 8 bits; a plain convert would clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode == "LA" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode not in ("L", "RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, RGBa...
        img = img.convert("RGB")
    if img.mode == "RGBA" and not alpha:
        ground = Image.new("RGB", img.size, (_WHITE, _WHITE, _WHITE))
        ground.paste(img, mask=img.getchannel("A"))
        img = ground
    return img


def _resize(img: PILImage.Image, transform: Transform) -> PILImage.Image:
    """img2dataset's modes: area averaging (BOX) to shrink, Lanczos to enlarge."""
    from PIL import Image

    width, height = img.size
    target = _target(width, height, transform)
    assert target is not None
    shrinking = target[0] * target[1] < width * height
    method = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
    if target != img.size:
        img = img.resize(target, method)
    size = transform.size
    if transform.mode == "center_crop":
        left, top = (target[0] - size) // 2, (target[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    elif transform.mode == "border":
        fill: Any = _WHITE if img.mode == "L" else (_WHITE,) * len(img.getbands())
        square = Image.new(img.mode, (size, size), fill)
        square.paste(img, ((size - target[0]) // 2, (size - target[1]) // 2))
        img = square
    return img


# -- perceptual hash ----------------------------------------------------------

_PHASH_SIDE = 32
_PHASH_LOW = 8
#: cos(pi * k * (2n + 1) / 64): DCT-II rows for the 8 lowest frequencies.
_COS = tuple(
    tuple(math.cos(math.pi * k * (2 * n + 1) / (2 * _PHASH_SIDE)) for n in range(_PHASH_SIDE))
    for k in range(_PHASH_LOW)
)


def _dot(a: Any, b: tuple[float, ...]) -> float:
    return float(sum(map(operator.mul, a, b)))


def perceptual_hash(img: PILImage.Image) -> int:
    """64-bit pHash (as imagehash.phash computes it): greyscale 32x32 (Lanczos), 2-D
    DCT-II, the 8x8 lowest frequencies, one bit per coefficient above their median.

    Only the 8x8 corner of the DCT is computed (320 dot products of 32 numbers), in
    plain Python: about a millisecond, with no numpy or scipy to install.
    """
    from PIL import Image

    grey = img.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = grey.tobytes()
    rows = [pixels[r * _PHASH_SIDE : (r + 1) * _PHASH_SIDE] for r in range(_PHASH_SIDE)]
    # first along each row (8 frequencies), then down each of those 8 columns
    partial = [[_dot(row, cos) for cos in _COS] for row in rows]
    low = [_dot([partial[r][u] for r in range(_PHASH_SIDE)], cos) for cos in _COS for u in range(8)]
    # low[k * 8 + u]: vertical frequency k, horizontal u (imagehash's dct[:8, :8] order)
    median = sorted(low)[len(low) // 2 - 1 : len(low) // 2 + 1]
    middle = (median[0] + median[1]) / 2
    bits = 0
    for value in low:
        bits = (bits << 1) | (value > middle)
    return bits


def distance(a: int, b: int) -> int:
    """Hamming distance of two 64-bit hashes."""
    return (a ^ b).bit_count()
