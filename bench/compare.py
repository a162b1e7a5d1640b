"""imgdl against the tools people use instead, on one machine, in one run.

    .venv/bin/python bench/compare.py [--count 20000] [--in-flight 64] [--rows a,b,...]

Serves a generated corpus (bench/corpus.py) from nginx on 127.0.0.1, measures
the machine's ceiling with wrk, then downloads the same list with every tool
into a tmpfs (/dev/shm) and checks each saved file against the corpus digests.
A row counts only if every image is on disk with the right bytes (the resize rows,
imgdl-resize and img2dataset-resize: if every image is on disk as a JPEG that
decodes, its smaller side 256). Writes
``bench/results/<date>-<host>.md`` (and ``.json``) and copies the table into
bench/README.md. See bench/README.md for what each row runs.
"""

from __future__ import annotations

import argparse
import compileall
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import corpus, measure
from bench.nginx import Nginx, ensure_installed
from downloader.devserver import ALLOW_LOOPBACK

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
I2D_VENV = Path(os.environ.get("BENCH_I2D_VENV", "/opt/img2dataset-venv"))
README_BEGIN, README_END = "<!-- compare:begin -->", "<!-- compare:end -->"


def imgdl(*flags: str) -> Callable[[Path, Path, int], list[str]]:
    def command(listing: Path, out: Path, in_flight: int) -> list[str]:
        return [str(VENV_BIN / "imgdl"), "fetch", str(listing), "-o", str(out),
                "--log-level", "warning", *flags]  # fmt: skip

    return command


def naive(listing: Path, out: Path, in_flight: int) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "naive_aiohttp.py"), str(listing), str(out),
            str(in_flight)]  # fmt: skip


def aria2c(listing: Path, out: Path, in_flight: int) -> list[str]:
    return ["aria2c", "-i", str(listing), "-d", str(out), "-j", str(in_flight), "-x1", "-s1",
            "--quiet=true", "--file-allocation=none", "--auto-file-renaming=false",
            "--allow-overwrite=true", "--max-tries=1", "--enable-http-keep-alive=true",
            "--summary-interval=0"]  # fmt: skip


def curl(listing: Path, out: Path, in_flight: int) -> list[str]:
    config = listing.with_suffix(".curl")
    if not config.exists():
        with open(listing) as source, open(config, "w") as target:
            for line in source:
                target.write(f'url = "{line.strip()}"\n')
    return ["curl", "--parallel", "--parallel-max", str(in_flight), "--silent", "--fail",
            "--remote-name-all", "--output-dir", str(out), "--config", str(config)]  # fmt: skip


def wget2(listing: Path, out: Path, in_flight: int) -> list[str]:
    return ["wget2", "--quiet", "--no-robots", "--max-threads", str(in_flight), "-P", str(out),
            "-i", str(listing)]  # fmt: skip


def img2dataset(listing: Path, out: Path, in_flight: int, *resize: str) -> list[str]:
    processes = os.cpu_count() or 1
    resize = resize or ("--resize_mode", "no", "--disable_all_reencoding", "True")
    return [str(I2D_VENV / "bin" / "img2dataset"), "--url_list", str(listing),
            "--input_format", "txt", "--output_folder", str(out), "--output_format", "files",
            *resize,
            "--processes_count", str(processes), "--thread_count", str(in_flight // processes),
            "--number_sample_per_shard", "1000", "--retries", "0", "--timeout", "10",
            "--enable_wandb", "False", "--compute_hash", "None"]  # fmt: skip


#: The resize rows: every image to keep_ratio RESIZE_SIZE, JPEG quality 95, both tools.
RESIZE_SIZE = 256


def img2dataset_resize(listing: Path, out: Path, in_flight: int) -> list[str]:
    resize = ["--resize_mode", "keep_ratio", "--image_size", str(RESIZE_SIZE)]
    return img2dataset(listing, out, in_flight, *resize, "--encode_format", "jpg",
                       "--encode_quality", "95")  # fmt: skip


IMGDL_RESIZE = ("--resize-mode", "keep_ratio", "--image-size", str(RESIZE_SIZE),
                "--image-format", "jpeg", "--image-quality", "95")  # fmt: skip

#: name -> (command builder, what the row is)
ROWS: dict[str, tuple[Callable[[Path, Path, int], list[str]], str]] = {
    "imgdl": (imgdl(), "imgdl fetch, defaults"),
    "imgdl-tuned": (
        imgdl("--concurrency", "32", "--shard-size", "5000"),
        "imgdl fetch --concurrency 32 --shard-size 5000",
    ),
    "imgdl-aiohttp": (
        imgdl("--http-client", "aiohttp"),
        "imgdl fetch --http-client aiohttp (direct requests through aiohttp's session)",
    ),
    "curl": (curl, "curl --parallel --parallel-max N"),
    "wget2": (wget2, "wget2 --max-threads N"),
    "aria2c": (aria2c, "aria2c -i -j N"),
    "naive-aiohttp": (naive, "bench/naive_aiohttp.py (semaphore, one session)"),
    "img2dataset": (
        img2dataset,
        f"img2dataset, files, resize off, {os.cpu_count()} processes",
    ),
    "imgdl-resize": (
        imgdl(*IMGDL_RESIZE),
        f"imgdl fetch --resize-mode keep_ratio --image-size {RESIZE_SIZE} --image-format jpeg",
    ),
    "img2dataset-resize": (
        img2dataset_resize,
        f"img2dataset, files, keep_ratio {RESIZE_SIZE}, jpg q95, {os.cpu_count()} processes",
    ),
}
#: Rows whose files are re-encoded: checked by decoding, not by their bytes.
RESIZE_ROWS = frozenset({"imgdl-resize", "img2dataset-resize"})
I2D_ROWS = frozenset({"img2dataset", "img2dataset-resize"})
DISK_ROW = "imgdl-disk"


def ensure_img2dataset() -> str | None:
    """img2dataset in its own virtual environment; the reason when it cannot be had."""
    if (I2D_VENV / "bin" / "img2dataset").exists():
        return None
    made = subprocess.run(
        [sys.executable, "-m", "venv", str(I2D_VENV)], capture_output=True, check=False
    )
    if made.returncode == 0:
        made = subprocess.run(
            [str(I2D_VENV / "bin" / "pip"), "install", "-q", "img2dataset"],
            capture_output=True,
            check=False,
        )
    if made.returncode == 0:
        return None
    return f"pip install img2dataset failed: {made.stderr[-300:]!r}"


@dataclasses.dataclass
class OnDisk:
    """The files of a row's output folder that passed the check, and when each was
    finished: its inode's change time, which the last write or link sets and a tool
    cannot set back (wget2 copies the server's Last-Modified into the mtime)."""

    finished: list[float] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.finished)

    def add(self, path: str) -> None:
        self.finished.append(os.stat(path).st_ctime)


def verify(out: Path, digests: set[str]) -> OnDisk:
    """The distinct corpus images in ``out`` with exactly the corpus bytes."""
    found: set[str] = set()
    on_disk = OnDisk()
    for folder, dirs, files in os.walk(out):
        dirs[:] = [name for name in dirs if name != ".imgdl"]
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                digest = hashlib.sha1(handle.read()).hexdigest()
            if digest in digests and digest not in found:
                found.add(digest)
                on_disk.add(path)
    return on_disk


def verify_resized(out: Path, size: int = RESIZE_SIZE) -> OnDisk:
    """The image files in ``out`` that decode fully as JPEG with their smaller side
    ``size`` (keep_ratio; the corpus images are all smaller, so all are scaled)."""
    from PIL import Image

    on_disk = OnDisk()
    for folder, dirs, files in os.walk(out):
        dirs[:] = [name for name in dirs if name != ".imgdl"]
        for name in files:
            if not name.endswith((".jpg", ".jpeg")):
                continue
            path = os.path.join(folder, name)
            try:
                with Image.open(path) as img:
                    img.load()
                    if img.format == "JPEG" and min(img.size) == size:
                        on_disk.add(path)
            except OSError:
                continue
    return on_disk


def timeline(finished: list[float], started_epoch: float) -> tuple[float | None, int | None]:
    """Seconds from the start to the first finished image, and the rate between the
    10th and the 90th percentile of finish times: the speed once a tool is running,
    its start-up and its last stragglers left out (a 20,000-image run lasts a few
    seconds, of which start-up can be a tenth)."""
    if not finished:
        return None, None
    times = sorted(finished)
    first = round(times[0] - started_epoch, 2)
    low, high = len(times) // 10, len(times) * 9 // 10
    span = times[high] - times[low]
    if high - low < 10 or span <= 0:
        return first, None
    return first, round((high - low) / span)


def ceiling(server: Nginx, names: list[str], work: Path, in_flight: int) -> dict[str, object]:
    if ensure_installed(("wrk", "wrk")):
        return {"error": "wrk could not be installed"}
    script = work / "rotate.lua"
    paths = work / "paths.txt"
    paths.write_text("".join(f"/img/{name}\n" for name in names))
    script.write_text(
        f'local paths = {{}}\nfor line in io.lines("{paths}") do paths[#paths + 1] = line end\n'
        "local i = 0\n"
        "request = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend\n"
    )
    result = subprocess.run(
        ["wrk", "-t1", f"-c{in_flight}", "-d5s", "-s", str(script), server.url],
        capture_output=True,
        text=True,
        check=False,
    )
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    return {"requests_per_s": float(rate.group(1)) if rate else None, "output": result.stdout}


def startup(listing_lines: int, work: Path) -> float | None:
    """Seconds from starting imgdl on the run's list to its first connection (a listener here)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    port = listener.getsockname()[1]
    stamp_list = work / "startup-urls.txt"
    stamp_list.write_text(
        "".join(f"http://127.0.0.1:{port}/img/{i:05d}.jpg\n" for i in range(listing_lines))
    )
    out = work / "out-startup"
    shutil.rmtree(out, ignore_errors=True)
    arrived: list[float] = []

    def accept() -> None:
        listener.settimeout(15)
        try:
            connection, _ = listener.accept()
            arrived.append(time.monotonic())
            connection.close()
        except OSError:
            pass

    waiter = threading.Thread(target=accept)
    waiter.start()
    started = time.monotonic()
    process = subprocess.Popen(
        imgdl()(stamp_list, out, 64),
        env={**os.environ, **ALLOW_LOOPBACK},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    waiter.join()
    # The parent only: its workers see it gone and leave, and multiprocessing's resource
    # tracker, left alive, removes the run's semaphores (killing the whole group leaked
    # them in /dev/shm).
    process.kill()
    process.wait()
    listener.close()
    time.sleep(2)
    shutil.rmtree(out, ignore_errors=True)
    return arrived[0] - started if arrived else None


def run_row(
    name: str,
    command: list[str],
    out: Path,
    digests: set[str],
) -> dict[str, object]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, **ALLOW_LOOPBACK}
    result = measure.run(command, env)
    on_disk = verify_resized(out) if name in RESIZE_ROWS else verify(out, digests)
    verified = on_disk.count
    count = len(digests)
    first, steady = timeline(on_disk.finished, result.started_epoch)
    row: dict[str, object] = {
        "row": name,
        "exit": result.returncode,
        "wall_s": round(result.wall_s, 2),
        "images_per_s": round(verified / result.wall_s) if result.wall_s else 0,
        "cpu_s_per_1000": round(result.cpu_s / max(verified, 1) * 1000, 3),
        "peak_rss_mib": round(result.tree_peak_kib / 1024),
        "verified": verified,
        "ok": verified == count,
        "first_image_s": first,
        "steady_images_per_s": steady,
    }
    if verified != count:
        row["error"] = f"{count - verified} of {count} images missing or wrong"
        row["stderr"] = result.stderr[-500:]
    shutil.rmtree(out, ignore_errors=True)
    return row


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": datetime.date.today().isoformat(),
    }


def ceiling_text(results: dict[str, object]) -> str:
    """The ceiling's rate, or why it was not measured (not wrk's whole output)."""
    ceiling_info = results["ceiling"]
    assert isinstance(ceiling_info, dict)
    rate = ceiling_info.get("requests_per_s")
    return f"{rate:,.0f} requests/s" if rate else f"not measured: {ceiling_info.get('error')}"


def table(results: dict[str, object]) -> str:
    info = results["machine"]
    assert isinstance(info, dict)
    lines = [
        f"Measured {info['date']} on {info['nproc']} cores ({info['cpu']}), Python "
        f"{info['python']}; {results['count']} images "
        f"({results['corpus_mib']} MiB), {results['in_flight']} in flight, served by "
        f"{results['server']}, output on tmpfs. `{results['command']}`",
        "",
    ]
    lines.append(
        f"Ceiling (wrk -t1 -c{results['in_flight']}, 5 s, same files): {ceiling_text(results)}."
    )
    start = results.get("startup_s")
    if start is not None:
        lines.append(f"imgdl start-up to first request on this run's list: {start:.2f} s.")
    rounds = int(str(results.get("rounds", 1)))
    if rounds > 1:
        lines.append(
            f"Each row ran {rounds} times, in rounds; the table gives its median run "
            "(the last column: images/s of every run, in order)."
        )
    head = (
        "| row | images/s | CPU s / 1,000 images | peak RSS (tree) | verified on disk | wall "
        "| first image | steady images/s |"
    )
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    lines += ["", head + (" runs |" if rounds > 1 else ""), rule + (" --- |" if rounds > 1 else "")]
    rows = results["rows"]
    assert isinstance(rows, list)
    for row in rows:
        runs_cell = ""
        if rounds > 1:
            each = row.get("runs_images_per_s")
            runs_cell = (
                f" {', '.join(f'{rate:,}' for rate in each)} |"
                if isinstance(each, list)
                else f" round {row.get('round')} |"
            )
        if "skipped" in row:
            lines.append(
                f"| {row['row']} | — | — | — | not run: {row['skipped']} | — | — | — |{runs_cell}"
            )
            continue
        verified = f"{row['verified']:,}" + ("" if row["ok"] else f" (FAILED: {row['error']})")
        rate_cell = f"{row['images_per_s']:,}" if row["ok"] else "—"
        first, steady = row.get("first_image_s"), row.get("steady_images_per_s")
        first_cell = f"{first:.2f} s" if isinstance(first, float | int) and row["ok"] else "—"
        steady_cell = f"{steady:,}" if isinstance(steady, int) and row["ok"] else "—"
        lines.append(
            f"| {row['row']} | {rate_cell} | {row['cpu_s_per_1000']:.2f} | "
            f"{row['peak_rss_mib']} MiB | {verified} | {row['wall_s']:.1f} s | {first_cell} | "
            f"{steady_cell} |{runs_cell}"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, object]) -> Path:
    folder = REPO / "bench" / "results"
    folder.mkdir(exist_ok=True)
    info = results["machine"]
    assert isinstance(info, dict)
    stem = folder / f"{info['date']}-{platform.node() or 'host'}"
    rendered = table(results)
    stem.with_suffix(".md").write_text(f"# bench/compare.py\n\n{rendered}")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    readme = REPO / "bench" / "README.md"
    text = readme.read_text()
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        _, tail = rest.split(README_END, 1)
        readme.write_text(f"{head}{README_BEGIN}\n{rendered}{README_END}{tail}")
    return stem.with_suffix(".md")


#: Seconds between two rows: the kernel frees the last row's 20,000 files after
#: they are deleted, and that work should not land in the next row's time.
SETTLE_S = 1.0


def run_one(
    name: str,
    args: argparse.Namespace,
    listing: Path,
    work: Path,
    digests: set[str],
    missing_tools: dict[str, list[str]],
    i2d_problem: str | None,
) -> dict[str, object]:
    """One run of the row ``name``: its measurements, or why it was not run."""
    if missing_tools.get(name):
        return {"row": name, "skipped": f"apt-get could not install {name}"}
    if name in I2D_ROWS and i2d_problem:
        return {"row": name, "skipped": i2d_problem}
    if name == DISK_ROW:
        args.disk.mkdir(parents=True, exist_ok=True)
        build, note = imgdl(), "imgdl fetch, defaults, output on the disk file system"
        out = args.disk / "out"
    else:
        build, note = ROWS[name]
        out = work / f"out-{name}"
    row = run_row(name, build(listing, out, args.in_flight), out, digests)
    row["note"] = note
    return row


def median_run(runs: list[dict[str, object]]) -> dict[str, object]:
    """The run that stands for a row: a failed one if any failed (a row with a missing
    file is a failure, whatever its other runs did), else the run with the median
    images/s, with every run's images/s beside it."""
    for run in runs:
        if "skipped" in run or not run.get("ok", False):
            return run
    ranked = sorted(runs, key=lambda run: float(str(run["images_per_s"])))
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs_images_per_s"] = [run["images_per_s"] for run in runs]
    return chosen


def _at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every_row = ",".join([*ROWS, DISK_ROW])
    parser.add_argument(
        "--count", type=int, default=20_000, help="images in the list (default 20,000)"
    )
    parser.add_argument(
        "--in-flight", type=int, default=64, help="downloads at once for the other tools"
    )
    parser.add_argument(
        "--rows",
        default=every_row,
        help=f"the rows to run, comma-separated (default all: {every_row})",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/dev/shm/imgdl-bench"),
        help="corpus, URL lists and outputs, on a tmpfs (default /dev/shm/imgdl-bench)",
    )
    parser.add_argument(
        "--disk",
        type=Path,
        default=Path("/var/tmp/imgdl-bench-disk"),
        help="the output folder of the imgdl-disk row (default /var/tmp/imgdl-bench-disk)",
    )
    parser.add_argument(
        "--rounds",
        type=_at_least_one,
        default=5,
        help="run every row this many times, in rounds (each round starting at another "
        "row); the table gives each row's median run, the slower of the middle two for "
        "an even number (default 5)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the wrk run")
    parser.add_argument(
        "--server", choices=["nginx", "python"], default="nginx", help="python: the fallback"
    )
    args = parser.parse_args()
    wanted = args.rows.split(",")
    unknown = [name for name in wanted if name not in ROWS and name != DISK_ROW]
    if unknown:  # before any measurement, not after minutes of it
        raise SystemExit(f"unknown row {unknown[0]!r}; rows: {', '.join([*ROWS, DISK_ROW])}")
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    names_digests = corpus.ensure(work / "corpus", args.count)
    digests = set(names_digests.values())
    names = sorted(names_digests)
    corpus_bytes = sum((work / "corpus" / "img" / name).stat().st_size for name in names)
    missing_tools = {
        "curl": ensure_installed(("curl", "curl")),
        "wget2": ensure_installed(("wget2", "wget2")),
        "aria2c": ensure_installed(("aria2", "aria2c")),
    }
    i2d_problem = ensure_img2dataset() if I2D_ROWS & set(wanted) else None
    # imgdl as pip installs it: its modules compiled to bytecode. The editable install
    # of a checkout compiles nothing, and with PYTHONDONTWRITEBYTECODE (set on the
    # project's VMs) every run compiled the package again (0.05-0.07 s of start-up),
    # which no installed tool of the table pays.
    compileall.compile_dir(REPO / "downloader", quiet=1)
    results: dict[str, object] = {
        "machine": machine(),
        "count": args.count,
        "corpus_mib": round(corpus_bytes / 2**20),
        "in_flight": args.in_flight,
        "command": " ".join(["bench/compare.py", *sys.argv[1:]]),
        "rows": [],
    }
    rows: list[dict[str, object]] = []
    with Nginx(work / "corpus", work / "nginx", prefer=args.server) as server:
        results["server"] = (
            "nginx (1 worker process)" if server.kind == "nginx" else "bench/static_server.py"
        )
        listing = work / "urls.txt"
        listing.write_text("".join(f"{server.url}/img/{name}\n" for name in names))
        with open(work / "urls.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "key"])
            writer.writerows([f"{server.url}/img/{name}", name] for name in names)
        (listing.with_suffix(".curl")).unlink(missing_ok=True)
        results["ceiling"] = (
            {"error": "skipped (--no-ceiling)"}
            if args.no_ceiling
            else ceiling(server, names, work, args.in_flight)
        )
        print(f"ceiling: {ceiling_text(results)}", flush=True)
        runs: dict[str, list[dict[str, object]]] = {name: [] for name in wanted}
        starts: list[float] = []
        for round_index in range(args.rounds):
            if "imgdl" in wanted:
                start = startup(args.count, work)
                if start is not None:
                    starts.append(start)
            shift = round_index % len(wanted)  # no row always first, or always after another
            for name in wanted[shift:] + wanted[:shift]:
                row = run_one(name, args, listing, work, digests, missing_tools, i2d_problem)
                row["round"] = round_index + 1
                runs[name].append(row)
                print(json.dumps(row), flush=True)
                time.sleep(SETTLE_S)
        if starts:
            results["startup_s"] = statistics.median(starts)
        results["rounds"] = args.rounds
        rows = [median_run(runs[name]) for name in wanted]
    results["rows"] = rows
    print(table(results))
    if not args.no_write:
        print(f"written to {write_results(results)}")
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
