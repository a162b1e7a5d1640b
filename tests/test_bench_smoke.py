"""The benchmark keeps working: a tiny run of bench/compare.py (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``bench/ARGS...`` from the repository root; it must exit 0."""
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_compare_runs_and_verifies_every_file(tmp_path: Path) -> None:
    result = _bench(
        "bench/compare.py", "--count", "200", "--rows", "imgdl,naive-aiohttp", "--rounds", "2",
        "--server", "python", "--no-ceiling", "--no-write", "--work", str(tmp_path / "work"),
    )  # fmt: skip
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "images/s" not in line and "---" not in line
    }
    assert set(rows) == {"imgdl", "naive-aiohttp"}, result.stdout
    for name, cells in rows.items():
        assert cells[5].strip() == "200", (name, cells)  # verified on disk, byte for byte
        first = float(cells[7].strip().removesuffix(" s"))  # the first image's finish
        assert 0 < first < float(cells[6].strip().removesuffix(" s")), (name, cells)
        assert int(cells[8].strip().replace(",", "")) > 0, (name, cells)  # steady rate
        assert len(cells[9].split(",")) == 2, (name, cells)  # images/s of both rounds
    assert "start-up to first request" in result.stdout


def test_resize_row_is_verified_by_decoding_at_the_target_size(tmp_path: Path) -> None:
    result = _bench(
        "bench/compare.py", "--count", "40", "--rows", "imgdl-resize", "--rounds", "1",
        "--server", "python", "--no-ceiling", "--no-write", "--work", str(tmp_path / "w"),
    )  # fmt: skip
    (row,) = [line.split("|") for line in result.stdout.splitlines() if "| imgdl-resize" in line]
    assert row[5].strip() == "40", result.stdout  # 40 JPEGs on disk, smaller side 256

    from PIL import Image

    from bench.compare import verify_resized  # the check itself refuses other files

    (tmp_path / "sized").mkdir()
    Image.new("RGB", (300, 256)).save(tmp_path / "sized" / "a.jpg")
    Image.new("RGB", (300, 200)).save(tmp_path / "sized" / "b.jpg")
    (tmp_path / "sized" / "c.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    assert verify_resized(tmp_path / "sized").count == 1


def test_timeline_is_the_rate_between_the_10th_and_90th_finish() -> None:
    from bench.compare import timeline

    # 100 images: the first at 0.5 s, then one every 10 ms, but the last 5 an hour late
    finished = [1000.5 + i * 0.01 for i in range(95)] + [4600.0] * 5
    first, steady = timeline(finished, started_epoch=1000.0)
    assert first == 0.5
    assert steady == 100  # images 10 to 90 (80 of them) in 0.8 s: the stragglers left out
    assert timeline([], 1000.0) == (None, None)
    assert timeline([1001.0] * 30, 1000.0) == (1.0, None)  # no span: no rate


def test_the_worker_path_benchmark_runs(tmp_path: Path) -> None:
    """bench/worker_path.py drives the Fetcher with fake responses: it broke once when
    the Fetcher's arguments changed, unnoticed until someone ran it."""
    result = _bench("bench/worker_path.py", "300", "1", str(tmp_path / "none"), timeout=120)
    assert "us/img, median" in result.stdout
