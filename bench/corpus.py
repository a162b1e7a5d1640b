"""The benchmark corpus: distinct real JPEG and PNG files of 10-30 KB, from a fixed seed.

    .venv/bin/python bench/corpus.py DIR [COUNT]

Writes ``DIR/img/NNNNN.jpg|png`` (one in five a PNG) and ``DIR/sha1.txt`` with
the digest of each file, which is how the benchmark checks what a tool saved.
A corpus already in DIR with the same count and seed is kept: generating 20,000
files takes about half a minute.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from pathlib import Path

from PIL import Image

SEED = 20261125
MIN_BYTES, MAX_BYTES = 10_000, 30_000


def _image(rng: random.Random, index: int) -> tuple[str, bytes]:
    """Random noise does not compress, so the pixel count sets the size."""
    png = index % 5 == 4
    while True:
        side = rng.randint(58, 98) if png else rng.randint(120, 180)
        pixels = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
        buffer = io.BytesIO()
        if png:
            pixels.save(buffer, "PNG", compress_level=1)
        else:
            pixels.save(buffer, "JPEG", quality=rng.randint(70, 90))
        data = buffer.getvalue()
        if MIN_BYTES <= len(data) <= MAX_BYTES:
            return f"{index:05d}.{'png' if png else 'jpg'}", data


def ensure(root: Path, count: int) -> dict[str, str]:
    """The corpus in ``root`` (made if missing): file name -> sha1 of its bytes."""
    stamp = root / "corpus.json"
    digests = root / "sha1.txt"
    wanted = {"count": count, "seed": SEED, "min": MIN_BYTES, "max": MAX_BYTES}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and digests.exists():
        return dict(line.split() for line in digests.read_text().splitlines())  # type: ignore[misc]
    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    found: dict[str, str] = {}
    for index in range(count):
        name, data = _image(rng, index)
        (folder / name).write_bytes(data)
        found[name] = hashlib.sha1(data).hexdigest()
    if len(set(found.values())) != count:
        raise SystemExit("corpus: two files came out the same")
    digests.write_text("".join(f"{name} {digest}\n" for name, digest in found.items()))
    stamp.write_text(json.dumps(wanted))
    return found


if __name__ == "__main__":
    made = ensure(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)
    print(f"{len(made)} files")
