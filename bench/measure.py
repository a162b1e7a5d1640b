"""Run one command and measure it: wall time, CPU of its whole tree, peak memory.

CPU is ``RUSAGE_CHILDREN`` before and after, which counts every descendant that
was waited for (pool workers are, by their parent). Memory is sampled from
``/proc`` every 50 ms: the peak of the summed RSS of the process tree, and the
peak of each process on its own (for the flat-memory check).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from downloader.proctree import descendants, rss_kib

SAMPLE_SECONDS = 0.05


@dataclasses.dataclass
class Measurement:
    returncode: int
    wall_s: float
    cpu_s: float
    tree_peak_kib: int
    #: peak RSS of each process of the tree, by pid; the root's pid is ``root``
    peaks_kib: dict[int, int]
    root: int
    stderr: str
    #: when the command was started, on the wall clock (file times are on it)
    started_epoch: float


def run(command: Sequence[str], env: Mapping[str, str] | None = None) -> Measurement:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_epoch = time.time()
    started = time.monotonic()
    process = subprocess.Popen(
        list(command),
        env=dict(env or os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peaks: dict[int, int] = {}
    tree_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        while not done.is_set():
            total = 0
            for pid in descendants(process.pid):
                rss = rss_kib(pid)
                total += rss
                peaks[pid] = max(peaks.get(pid, 0), rss)
            tree_peak = max(tree_peak, total)
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    wall = time.monotonic() - started
    done.set()
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measurement(
        returncode=process.returncode,
        wall_s=wall,
        cpu_s=cpu,
        tree_peak_kib=tree_peak,
        peaks_kib=peaks,
        root=process.pid,
        stderr=stderr.decode(errors="replace"),
        started_epoch=started_epoch,
    )
