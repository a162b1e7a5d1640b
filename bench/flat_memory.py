"""Memory must not grow with the list: 10,000 URLs against 1,000,000, same peaks.

    .venv/bin/python bench/flat_memory.py [--small 10000] [--large 1000000]

nginx on 127.0.0.1 answers nine URLs in ten with a fast 404 and one with a tiny
PNG. Each list is fetched by ``imgdl fetch`` (defaults) into a tmpfs; the peak
RSS of the parent and of each worker is sampled from /proc. Prints both runs,
the ratio of the peaks, and whether the manifest holds exactly one record per
line. Exit 1 if a peak grew by more than 10 % or a manifest is wrong.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import measure
from bench.nginx import Nginx
from downloader.devserver import ALLOW_LOOPBACK

TOLERANCE = 0.10


def write_list(path: Path, base: str, count: int) -> None:
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(f"{base}/t/{i}.png\n" if i % 10 == 0 else f"{base}/404/{i}\n")


def manifest_lines(out: Path) -> tuple[int, int]:
    """(records, distinct input lines) of the manifest."""
    records, lines = 0, set()
    with open(out / "manifest.jsonl", "rb") as handle:
        for raw in handle:
            records += 1
            lines.add(orjson.loads(raw)["line"])
    return records, len(lines)


def one_run(server: Nginx, work: Path, count: int) -> dict[str, object]:
    listing = work / f"flat-{count}.txt"
    write_list(listing, server.url, count)
    out = work / f"flat-out-{count}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "downloader", "fetch", str(listing), "-o", str(out),
               "--log-level", "warning"]  # fmt: skip
    result = measure.run(command, {**os.environ, **ALLOW_LOOPBACK})
    workers = [
        peak for pid, peak in result.peaks_kib.items() if pid != result.root and peak > 20_000
    ]  # multiprocessing's resource tracker stays near 10 MiB and is not a worker
    records, distinct = manifest_lines(out)
    shutil.rmtree(out, ignore_errors=True)
    listing.unlink()
    return {
        "urls": count,
        "exit": result.returncode,
        "wall_s": round(result.wall_s, 1),
        "urls_per_s": round(count / result.wall_s),
        "parent_mib": round(result.peaks_kib.get(result.root, 0) / 1024, 1),
        "worker_mib": round(max(workers, default=0) / 1024, 1),
        "tree_mib": round(result.tree_peak_kib / 1024, 1),
        "manifest_ok": records == count and distinct == count,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/dev/shm/imgdl-bench"))
    args = parser.parse_args()
    root = args.work / "flat-root"
    root.mkdir(parents=True, exist_ok=True)
    with Nginx(root, args.work / "nginx-flat") as server:
        runs = [one_run(server, args.work, count) for count in (args.small, args.large)]
    print("| URLs | wall | URLs/s | parent peak | largest worker peak | tree peak | manifest |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for run in runs:
        print(
            f"| {run['urls']:,} | {run['wall_s']} s | {run['urls_per_s']:,} | "
            f"{run['parent_mib']} MiB | {run['worker_mib']} MiB | {run['tree_mib']} MiB | "
            f"{'one record per line' if run['manifest_ok'] else 'WRONG'} |"
        )
    small, large = runs
    growth = {
        key: float(large[key]) / float(small[key]) - 1  # type: ignore[arg-type]
        for key in ("parent_mib", "worker_mib")
    }
    print("growth: " + ", ".join(f"{key} {value:+.1%}" for key, value in growth.items()))
    flat = all(value <= TOLERANCE for value in growth.values())
    return 0 if flat and small["manifest_ok"] and large["manifest_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
