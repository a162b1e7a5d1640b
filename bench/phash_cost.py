"""What perceptual dedupe costs: CPU per image and memory, with the content table full.

    .venv/bin/python bench/phash_cost.py [--images 200] [--rows 100000] [--distance 4]

1. decode + pHash of photo-like JPEGs (400x300 and 1600x1200) as the worker does it
   (transform.process with only the pHash asked for: JPEG draft decode at 1/8 scale),
   and the pHash alone of an already decoded image (what a resize run adds);
2. claims against a content table (contentindex.ContentIndex) holding ``--rows``
   images: exact (one primary-key lookup) and perceptual (``distance + 1`` band
   lookups). The stored pHashes are random, the best case for the bands: real
   pHashes cluster, so more candidates share a band;
3. the process's resident memory before the table and with it open (its page
   caches are 2 MiB per connection), and the table's size on disk.

Prints one JSON object. CPU-bound: run it on a quiet machine for numbers to quote.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw, ImageFilter

from downloader.contentindex import CONTENT_DB, ContentIndex, _signed, bands
from downloader.transform import Transform, perceptual_hash, process
from downloader.validate import JPEG


def scene(rnd: random.Random, size: tuple[int, int]) -> bytes:
    img = Image.new("RGB", size, (rnd.randrange(256), 128, rnd.randrange(256)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rnd.randrange(size[0]), rnd.randrange(size[1])
        box = (x, y, x + rnd.randrange(size[0] // 10, size[0] // 2), y + size[1] // 3)
        draw.ellipse(box, fill=(rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    out = io.BytesIO()
    img.filter(ImageFilter.GaussianBlur(3)).save(out, "JPEG", quality=85)
    return out.getvalue()


def rss_mib() -> float:
    """Resident memory now (not the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return round(pages * resource.getpagesize() / 2**20, 1)


def cpu_ms(func: object, items: list[object]) -> float:
    assert callable(func)
    started = time.process_time()
    for item in items:
        func(item)
    return round((time.process_time() - started) * 1000 / len(items), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--distance", type=int, default=4)
    args = parser.parse_args()
    rnd = random.Random(9)
    result: dict[str, object] = {"images": args.images, "rows": args.rows}
    only_hash = Transform(phash=True)
    for label, size in (("400x300", (400, 300)), ("1600x1200", (1600, 1200))):
        bodies: list[object] = [scene(rnd, size) for _ in range(args.images)]
        result[f"decode_and_phash_ms_{label}"] = cpu_ms(
            lambda body: process(body, JPEG, only_hash), bodies
        )
    decoded: list[object] = []
    for _ in range(args.images):
        with Image.open(io.BytesIO(scene(rnd, (400, 300)))) as img:
            img.load()
            decoded.append(img.copy())
    result["phash_of_decoded_ms"] = cpu_ms(perceptual_hash, decoded)

    del decoded
    result["rss_before_table_mib"] = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONTENT_DB
        index = ContentIndex(path, args.distance, lambda relpath: True)
        db = index._db
        db.execute("BEGIN")
        for n in range(args.rows):
            phash = rnd.getrandbits(64)
            key = rnd.randbytes(32)
            db.execute(
                "INSERT INTO content VALUES (?, ?, ?, ?, NULL, NULL, 1)",
                (key, _signed(phash), f"x/{n}.jpg", f"u.txt:{n}"),
            )
            db.executemany(
                "INSERT INTO band VALUES (?, ?, ?)",
                [(k, v, key) for k, v in bands(phash, args.distance + 1)],
            )
        db.execute("COMMIT")
        claims = [(rnd.randbytes(32).hex(), rnd.getrandbits(64)) for _ in range(1000)]
        exact = ContentIndex(path, None, lambda relpath: True)
        started = time.perf_counter()
        for sha, _ in claims:
            exact.claim(sha, None, "new.jpg", "v.txt:1")
        result["exact_claim_ms"] = round((time.perf_counter() - started), 3)  # per 1000 = ms
        claims = [(rnd.randbytes(32).hex(), rnd.getrandbits(64)) for _ in range(1000)]
        started = time.perf_counter()
        for sha, phash in claims:
            index.claim(sha, phash, "new.jpg", "v.txt:1")
        result["perceptual_claim_ms"] = round((time.perf_counter() - started), 3)
        result["rss_with_table_open_mib"] = rss_mib()
        index.close()
        exact.close()
        size = sum(p.stat().st_size for p in path.parent.iterdir())
        result["table_mib"] = round(size / 2**20, 1)
        result["table_bytes_per_image"] = round(size / (args.rows + 2000))
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
