"""Live progress in the parent, fed by the workers through counters in shared memory.

Workers add what their journals counted (outcomes by status or reason, bytes
saved) to :class:`SharedCounters` every :data:`FEED_SECONDS` and at the end of
each shard; the parent adds the outcomes it records itself (invalid lines,
duplicates, lines stopped before they were sent). Nothing is read back from
files, so progress costs the run a lock every half second per worker, not a pass
over the manifest.

On a terminal, a tqdm bar with images/s, MB/s, failures by reason and an ETA
once the total is known; otherwise (a container) a structured ``progress`` log
line every ``log.progress_interval`` seconds.
"""

from __future__ import annotations

import collections
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from multiprocessing.context import BaseContext
from typing import Any, TextIO, cast

from downloader.errors import ImgdlError
from downloader.objstore import is_s3
from downloader.outcomes import Outcome, Reason, Status
from downloader.sources import open_binary
from downloader.telemetry import get_logger, log_to

#: Every outcome key: "saved", then each reason (a skip or a failure).
KEYS: tuple[str, ...] = (Status.SAVED.value, *(r.value for r in Reason))
_INDEX = {key: i for i, key in enumerate(KEYS)}
_BYTES = len(KEYS)
_FAILED = frozenset(r.value for r in Reason if r.status is Status.FAILED)
#: How often a worker adds its counts to the shared ones.
FEED_SECONDS = 0.5
#: How often the bar on a terminal is redrawn.
BAR_SECONDS = 0.25
#: tqdm's line before the total is known, and after.
_COUNTING = "{n_fmt} lines [{elapsed}{postfix}]"
_BAR = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} lines [{elapsed}<{remaining}{postfix}]"
#: The window over which images/s and MB/s are measured.
RATE_WINDOW_SECONDS = 10.0


def key_of(outcome: Outcome) -> str:
    return outcome.reason.value if outcome.reason is not None else outcome.status.value


class SharedCounters:
    """Outcome counts and bytes in shared memory, one slot each, under one lock."""

    def __init__(self, context: BaseContext) -> None:
        self._array = context.Array("q", len(KEYS) + 1)

    def add(self, counts: Mapping[str, int], saved_bytes: int) -> None:
        with self._array.get_lock():
            for key, n in counts.items():
                self._array[_INDEX[key]] += n
            self._array[_BYTES] += saved_bytes

    def read(self) -> list[int]:
        with self._array.get_lock():
            return [int(n) for n in self._array[:]]


class Feed:
    """A worker's side: passes on what grew in its journal's counts since the last push."""

    def __init__(self, shared: SharedCounters | None) -> None:
        self._shared = shared
        self._pushed: collections.Counter[str] = collections.Counter()
        self._pushed_bytes = 0

    def push(self, counts: Mapping[str, int], saved_bytes: int) -> None:
        if self._shared is None:
            return
        delta = {k: n - self._pushed[k] for k, n in counts.items() if n != self._pushed[k]}
        grown = saved_bytes - self._pushed_bytes
        if delta or grown:
            self._shared.add(delta, grown)
            self._pushed.update(delta)
            self._pushed_bytes = saved_bytes


def count_lines(paths: Iterable[str], tasks: int = 1) -> int | None:
    """Lines in the input files, for an estimate of the total (blank lines, comments
    and CSV headers included; the exact count replaces it once the input is read);
    a task of a split job takes about 1/``tasks`` of them. None for standard input,
    which cannot be read twice."""
    total = 0
    for path in paths:
        if path == "-" or is_s3(path):  # an object would be read twice
            return None
        with open_binary(path) as handle:  # gzip undone, as the reader does
            while chunk := handle.read(1 << 20):
                total += chunk.count(b"\n")
    return total // tasks


class _AboveTheBar(io.TextIOBase):
    """stderr for log lines while the bar is shown: each whole line is written above
    the bar (tqdm clears it, then draws it again), not glued to its end."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            with tqdm.external_write_mode(file=sys.stderr):
                sys.stderr.write(lines + "\n")
                sys.stderr.flush()
        return len(text)


class Progress:
    """The parent's side: sums the workers' and its own counts and shows them."""

    def __init__(
        self,
        shared: SharedCounters,
        *,
        terminal: bool,
        interval: float,
        lines: Callable[[], tuple[int, int | None]],
        estimate: Callable[[], int | None] | None = None,
    ) -> None:
        """``lines`` tells how many lines an earlier run finished and, once the input
        has been read to its end, how many it has; ``estimate`` counts them before."""
        self.shared = shared
        self.terminal = terminal
        self.interval = interval
        self._own = [0] * (len(KEYS) + 1)
        self._lines = lines
        self._estimated: int | None = None
        self._estimate = estimate
        self._started = time.monotonic()
        # (time, saved, bytes); the start is the first sample, so that a run shorter
        # than one interval still gets its rates in the final line
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(
            [(self._started, 0, 0)]
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._log = get_logger(role="parent")

    # -- counting ------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        """An outcome the parent made itself (the workers count theirs)."""
        self._own[_INDEX[key_of(outcome)]] += 1

    def snapshot(self) -> dict[str, Any]:
        counts = [a + b for a, b in zip(self.shared.read(), self._own, strict=True)]
        by_key = {key: counts[i] for i, key in enumerate(KEYS) if counts[i]}
        saved = by_key.get(Status.SAVED.value, 0)
        failed = {k: n for k, n in by_key.items() if k in _FAILED}
        done = sum(by_key.values())
        now = time.monotonic()
        self._samples.append((now, saved, counts[_BYTES]))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_SECONDS:
            self._samples.popleft()
        first = self._samples[0]
        span = now - first[0]
        images_per_s = (saved - first[1]) / span if span > 0 else 0.0
        bytes_per_s = (counts[_BYTES] - first[2]) / span if span > 0 else 0.0
        carried, exact = self._lines()
        total = exact if exact is not None else self._estimated
        done_lines = done + carried
        elapsed = now - self._started
        eta: float | None = None
        if total is not None and done > 0 and total >= done_lines:
            eta = (total - done_lines) * elapsed / done
        return {
            "done": done_lines,
            "total": total,
            "saved": saved,
            "skipped": done - saved - sum(failed.values()),
            "failed": sum(failed.values()),
            "failed_by_reason": dict(sorted(failed.items(), key=lambda kv: -kv[1])),
            "resumed": carried,
            "bytes": counts[_BYTES],
            "images_per_s": round(images_per_s, 1),
            "mb_per_s": round(bytes_per_s / 1e6, 2),
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta),
        }

    # -- showing -------------------------------------------------------------

    def start(self) -> Progress:
        if self._estimate is not None:
            threading.Thread(target=self._count, name="progress-count", daemon=True).start()
        if self.terminal:
            from tqdm import tqdm

            try:  # a terminal that does not know its size says 0 (tqdm then hides the bar)
                size = os.get_terminal_size(sys.stderr.fileno())
            except OSError:
                size = os.terminal_size((0, 0))
            self._bar = tqdm(
                total=None,
                file=sys.stderr,
                # dynamic sizing would read the 0 again at every redraw
                dynamic_ncols=size.columns > 0 and size.lines > 0,
                ncols=size.columns or 100,
                nrows=size.lines or 24,
                smoothing=0.1,
                bar_format=_COUNTING,
            )
            log_to(cast(TextIO, _AboveTheBar()))  # a text stream, as io.TextIOBase
        self._thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._thread.start()
        return self

    def _count(self) -> None:
        assert self._estimate is not None
        try:
            self._estimated = self._estimate()
        except (OSError, EOFError, ImgdlError):  # a bad input: the reader reports it
            self._estimated = None

    def _tick(self) -> None:
        period = BAR_SECONDS if self.terminal else self.interval
        while not self._stop.wait(period):
            self.show()

    def show(self) -> None:
        state = self.snapshot()
        if self._bar is None:
            self._log.info("progress", **state)
            return
        bar = self._bar
        if state["total"] is not None and bar.total != state["total"]:
            bar.total = state["total"]
            bar.bar_format = _BAR
        failures = ", ".join(f"{k} {n}" for k, n in list(state["failed_by_reason"].items())[:3])
        bar.set_postfix_str(
            f"{state['images_per_s']:.0f} img/s, {state['mb_per_s']:.1f} MB/s, "
            f"saved {state['saved']}, failed {state['failed']}"
            + (f" ({failures})" if failures else ""),
            refresh=False,
        )
        bar.update(state["done"] - bar.n)

    def stop(self) -> None:
        """Stop the ticks and show the final state (on a terminal, the bar stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.show()  # the final state: every line counted
        if self._bar is not None:
            self._bar.close()
            log_to(sys.stderr)
