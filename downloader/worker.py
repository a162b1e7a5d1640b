"""The worker process: signals, the parent watch, one shard at a time.

``init_worker`` runs once per process (the pool's initializer; the process is
forked from the fork server of ``prestart``, so no thread of the parent is
inherited and every module is loaded already). ``run_shard``
is what the parent submits: it runs :class:`downloader.shardrun.ShardRun` in an
event loop. The parent imports this module for the pool; the download machinery
(aiohttp and the rest) is imported by the workers only, which saves the parent
about 0.2 s of start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as MpEvent
from multiprocessing.util import Finalize
from pathlib import Path

from downloader.limits import SharedLimits
from downloader.objstore import S3Location
from downloader.outcomes import Job
from downloader.prestart import STOP_SIGNALS
from downloader.progress import SharedCounters
from downloader.settings import Settings
from downloader.sharding import Shard
from downloader.telemetry import configure_logging

#: How often an idle worker checks that its parent is still there.
ORPHAN_POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    outdir: Path
    stop: MpEvent
    limits: SharedLimits
    #: False only when no file can stand at a final name (see Store)
    probe_existing: bool = True
    #: where the shards add their counts for the parent's progress display
    progress: SharedCounters | None = None
    #: where bodies are written before they are complete (the run's state folder)
    parts_dir: Path | None = None
    #: this task's index when the job is split (for telemetry's resource)
    task_index: int | None = None
    #: an s3:// output: where the images go (``outdir`` is then the local state folder)
    s3: S3Location | None = None
    #: the listing of that prefix made when the run began (objstore.ObjectIndex)
    objects_index: Path | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ShardResult:
    """What a worker reports back; the outcomes themselves are in the journal."""

    shard_id: int
    attempt: int
    pid: int
    counts: dict[str, int]
    elapsed_s: float
    #: jobs that failed and are to be tried again later, with the delay in seconds;
    #: they have no record in the journal
    deferred: tuple[tuple[Job, float], ...] = ()


_context: WorkerContext | None = None


def init_worker(context: WorkerContext) -> None:
    """Pool initializer: signals are the parent's business; logs are set up per process."""
    global _context
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    # Blocked since the fork server started (see prestart); ignored now, unblock.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _context = context
    configure_logging(context.settings.log.level, context.settings.log.format)
    import downloader.shardrun  # noqa: F401  aiohttp and the rest, before the first shard

    threading.Thread(target=_exit_when_orphaned, name="orphan-watch", daemon=True).start()


def at_exit(action: Callable[[], object]) -> None:
    """Run ``action`` when this worker leaves normally (the last registered first).

    Not ``atexit``: a process forked from the fork server ends in ``os._exit``
    and runs no exit hook (opentelemetry-python #4005); multiprocessing runs its
    own finalizers as the process's ``run`` returns, under every start method.
    """
    Finalize(None, action, exitpriority=10)


def parent_gone() -> bool:
    """The parent process has died (killed with SIGKILL, say).

    Our parent in the process tree is the fork server, which outlives the parent
    while workers hold it open, so ``getppid`` tells nothing; the pipe that
    multiprocessing keeps from the parent to each child (its sentinel) ends when
    the parent's last descriptor closes.
    """
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


_shard_running = threading.Event()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux, macOS): the same work for less CPU."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


_runner: asyncio.Runner | None = None


def _event_loop() -> asyncio.Runner:
    """The process's one event loop, kept from shard to shard with its HTTP session."""
    global _runner
    if _runner is None:
        _runner = asyncio.Runner(loop_factory=_loop_factory())
        at_exit(_close_event_loop)
    return _runner


def _close_event_loop() -> None:
    """At exit, close the session cleanly (no 'unclosed session' noise), then the loop."""
    from downloader.shardrun import close_process_session

    if _runner is not None:
        with contextlib.suppress(Exception):
            _runner.run(close_process_session())
        _runner.close()


def _exit_when_orphaned() -> None:
    """A worker whose parent was killed would wait for work forever on the pool's pipe.

    A shard in progress notices on its own (``_watch_stop``) and journals its
    URLs; once none is running, leave.
    """
    while not parent_gone() or _shard_running.is_set():
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(0)


def run_shard(shard: Shard) -> ShardResult:
    assert _context is not None, "init_worker was not run in this process"
    if parent_gone():  # a shard left in the queue of a killed run:
        os._exit(0)  # its lines belong to the next run now; touch nothing
    _shard_running.set()
    try:
        from downloader.shardrun import ShardRun  # imported already by init_worker

        return _event_loop().run(ShardRun(_context, shard).run())
    finally:
        _shard_running.clear()
