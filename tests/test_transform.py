"""Resize and re-encode (image.*): the modes, colour modes, EXIF orientation, guards,
and a real run whose stored files are read back."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFilter

from downloader.devserver import DevServer
from downloader.outcomes import Reason
from downloader.transform import Transform, distance, perceptual_hash, process
from downloader.validate import JPEG, PNG, InvalidImage
from tests.conftest import clean_env, image_files, read_manifest, run_cli, write_list


def encoded(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def picture(width: int = 300, height: int = 200) -> Image.Image:
    """Something with structure (a pHash of flat noise means nothing)."""
    return Image.effect_mandelbrot((width, height), (-2.2, -1.2, 0.8, 1.2), 60).convert("RGB")


def scene(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A photo-like picture: blurred coloured shapes, different for each seed."""
    rnd = random.Random(seed)

    def colour() -> tuple[int, int, int]:
        return (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))

    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        box = (x, y, x + rnd.randrange(30, 200), y + rnd.randrange(30, 150))
        (draw.ellipse if rnd.random() < 0.5 else draw.rectangle)(box, fill=colour())
    return img.filter(ImageFilter.GaussianBlur(3))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("keep_ratio", (96, 64)),  # smaller side to 64, ratio kept
        ("center_crop", (64, 64)),
        ("border", (64, 64)),
        ("no", (300, 200)),
    ],
)
def test_modes_give_img2dataset_sizes(mode: str, expected: tuple[int, int]) -> None:
    made = process(encoded(picture()), PNG, Transform(mode=mode, size=64, format="jpeg"))
    assert made.body is not None
    stored = Image.open(io.BytesIO(made.body))
    assert stored.format == "JPEG"
    assert stored.size == expected == (made.width, made.height)
    assert (made.original_width, made.original_height) == (300, 200)
    assert made.image is JPEG


def test_border_pads_white_around_the_fitted_image() -> None:
    black = Image.new("RGB", (200, 100), (0, 0, 0))
    made = process(encoded(black), PNG, Transform(mode="border", size=50, format="png"))
    assert made.body is not None
    stored = Image.open(io.BytesIO(made.body)).convert("RGB")
    assert stored.size == (50, 50)
    assert stored.getpixel((25, 2)) == (255, 255, 255)  # the pad above
    assert stored.getpixel((25, 25)) == (0, 0, 0)  # the image in the middle


def test_upscales_like_img2dataset_too() -> None:
    made = process(encoded(picture(40, 20)), PNG, Transform(mode="keep_ratio", size=64))
    assert (made.width, made.height) == (128, 64)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to show
    body = encoded(picture(300, 200), "JPEG", exif=exif)
    made = process(body, JPEG, Transform(mode="keep_ratio", size=100, format="jpeg"))
    assert (made.original_width, made.original_height) == (200, 300)
    assert (made.width, made.height) == (100, 150)
    assert made.body is not None
    assert Image.open(io.BytesIO(made.body)).size == (100, 150)


@pytest.mark.parametrize("source_mode", ["P", "PA", "LA", "RGBA", "CMYK", "I;16", "1", "L"])
@pytest.mark.parametrize(
    ("fmt", "allowed"), [("jpeg", {"L", "RGB"}), ("png", {"L", "RGB", "RGBA"})]
)
def test_colour_modes_are_normalised(source_mode: str, fmt: str, allowed: set[str]) -> None:
    if source_mode == "I;16":
        img = Image.new("I;16", (80, 40), 40000)
    elif source_mode == "PA":
        img = picture(80, 40).convert("RGBA").convert("PA")
    else:
        img = picture(80, 40).convert(source_mode)
    if source_mode == "P":
        img.info["transparency"] = 0
    body = encoded(img, "TIFF" if source_mode in ("CMYK", "PA") else "PNG")
    made = process(body, PNG, Transform(mode="keep_ratio", size=20, format=fmt))
    assert made.body is not None
    stored = Image.open(io.BytesIO(made.body))
    assert stored.mode in allowed
    assert stored.size == (40, 20)
    if source_mode == "I;16":  # 40000/65535 of full scale, not clipped to white
        assert 150 <= stored.convert("L").getpixel((5, 5)) <= 160


def test_transparent_pixels_become_white_in_jpeg() -> None:
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    made = process(encoded(clear), PNG, Transform(mode="keep_ratio", size=10, format="jpeg"))
    assert made.body is not None
    red, green, blue = Image.open(io.BytesIO(made.body)).convert("RGB").getpixel((5, 5))
    assert min(red, green, blue) > 245


def test_too_many_pixels_is_a_decompression_bomb_before_decoding() -> None:
    body = encoded(Image.new("L", (1000, 1000)))
    with pytest.raises(InvalidImage) as caught:
        process(body, PNG, Transform(mode="keep_ratio", max_pixels=999_999))
    assert caught.value.reason is Reason.DECOMPRESSION_BOMB


def test_a_thin_image_enlarged_past_max_pixels_is_a_bomb_not_an_allocation() -> None:
    """Found in review: a 1x6000 PNG of about 100 bytes, keep_ratio 256, became a
    256x1,536,000 image (1.7 GB of memory); the target size is checked first now."""
    body = encoded(Image.new("L", (1, 6000)))
    assert len(body) < 1000
    with pytest.raises(InvalidImage) as caught:
        process(body, PNG, Transform(mode="keep_ratio", size=256, max_pixels=89_478_485))
    assert caught.value.reason is Reason.DECOMPRESSION_BOMB
    assert "256x1536000" in str(caught.value)


def test_corrupt_image_is_a_decode_error() -> None:
    body = encoded(picture(), "JPEG")[:400] + b"\x00" * 50
    with pytest.raises(InvalidImage) as caught:
        process(body, JPEG, Transform(mode="keep_ratio"))
    assert caught.value.reason is Reason.DECODE_ERROR


def test_phash_survives_resizing_and_recompression_but_tells_images_apart() -> None:
    base = scene(0)
    same = perceptual_hash(base)
    smaller = perceptual_hash(Image.open(io.BytesIO(encoded(base.resize((200, 150)), "JPEG"))))
    worse = perceptual_hash(Image.open(io.BytesIO(encoded(base, "JPEG", quality=30))))
    assert distance(same, smaller) <= 4 and distance(same, worse) <= 4
    others = [perceptual_hash(scene(seed)) for seed in range(1, 10)]
    assert min(distance(same, other) for other in others) > 16


def test_run_stores_resized_images_and_records_both_versions(tmp_path: Path) -> None:
    images = tmp_path / "served"
    images.mkdir()
    for n, size in enumerate([(320, 240), (100, 300), (64, 64)]):
        (images / f"{n}.png").write_bytes(encoded(picture(*size)))
    with DevServer(images=images) as server:
        listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/{n}.png" for n in range(3)])
        out = tmp_path / "out"
        done = run_cli(
            "fetch",
            str(listing),
            "-o",
            str(out),
            "--resize-mode",
            "keep_ratio",
            "--image-size",
            "32",
            "--image-format",
            "webp",
            "--image-quality",
            "80",
            "--processes",
            "2",
            "--shard-size",
            "1",
            env=clean_env(),
        )
    assert done.returncode == 0, done.stderr
    records = sorted(read_manifest(out), key=lambda r: r["line"])
    assert [r["status"] for r in records] == ["saved"] * 3
    files = image_files(out)
    assert len(files) == 3 and all(f.suffix == ".webp" for f in files)
    expected = [(43, 32), (32, 96), (32, 32)]  # 320 x 32 / 240 = 42.7
    originals = [(320, 240), (100, 300), (64, 64)]
    for record, size, original in zip(records, expected, originals, strict=True):
        stored = (out / record["path"]).read_bytes()
        with Image.open(io.BytesIO(stored)) as img:
            assert img.format == "WEBP" and img.size == size
        assert (record["width"], record["height"]) == size
        assert (record["original_width"], record["original_height"]) == original
        assert record["content_type"] == "image/webp"
        assert record["bytes"] == len(stored)
        assert record["sha256"] == hashlib.sha256(stored).hexdigest()
        served = (images / Path(record["url"]).name).read_bytes()
        assert record["original_sha256"] == hashlib.sha256(served).hexdigest()
        assert record["original_bytes"] == len(served)


def test_without_image_settings_the_bytes_are_stored_as_downloaded(
    server: DevServer, tmp_path: Path
) -> None:
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/0.jpg"])
    out = tmp_path / "out"
    done = run_cli("fetch", str(listing), "-o", str(out), env=clean_env())
    assert done.returncode == 0, done.stderr
    (record,) = read_manifest(out)
    assert (out / record["path"]).read_bytes() == server.image(0)[0]
    assert record["original_sha256"] is None and record["original_width"] is None


def test_bomb_and_corrupt_bodies_are_recorded_with_resize_on(tmp_path: Path) -> None:
    bodies = {
        "big": (encoded(Image.new("L", (2000, 2000))), "image/png"),
        "broken": (encoded(picture(), "JPEG")[:300], "image/jpeg"),
    }
    with DevServer(bodies=bodies) as server:
        listing = write_list(tmp_path / "u.txt", [f"{server.url}/body/{n}" for n in bodies])
        out = tmp_path / "out"
        done = run_cli(
            "fetch",
            str(listing),
            "-o",
            str(out),
            "--resize-mode",
            "center_crop",
            env=clean_env(IMGDL_VALIDATE_MAX_PIXELS="1000000"),
        )
    assert done.returncode == 1, done.stderr
    reasons = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in read_manifest(out)}
    assert reasons == {"big": "decompression_bomb", "broken": "decode_error"}
    assert image_files(out) == []


def test_an_image_size_without_a_resize_mode_is_named_not_ignored(
    server: DevServer, tmp_path: Path
) -> None:
    """Found by a new user: --image-size alone stored full-size images without a word."""
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/1.jpg"])
    done = run_cli("fetch", str(listing), "-o", str(tmp_path / "out"), "--image-size", "48")
    assert done.returncode == 0, done.stderr
    assert "image.size has no effect while image.resize_mode is no" in done.stderr
    (record,) = read_manifest(tmp_path / "out")
    assert record["status"] == "saved" and record["original_width"] is None
