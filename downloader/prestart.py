"""The workers' fork server, started before the parent has done anything else.

A worker needs about half a second of imports (pydantic, aiohttp, the
download machinery) before its first request. Under ``spawn`` each worker paid
them itself, after the parent had imported its own modules, read the settings
and opened the output folder: the first image came about 0.9 s after start.
The ``forkserver`` start method imports them once, in a server process that
:func:`start` launches as the very first thing ``imgdl fetch`` does, so the
imports run while the parent does its own set-up; each worker is then a
``fork`` of that server, a few milliseconds, with every module loaded.

The server is a fresh interpreter (no thread of the parent is inherited: the
reason ``fork`` itself is not used) and stays single-threaded, so forking it
is safe. It is started with SIGINT, SIGTERM and SIGHUP blocked: the workers it
forks inherit the mask and ``worker.init_worker`` sets the signals to ignored
before unblocking them, so a Ctrl-C sent to the process group cannot hit a
worker before it is ready (see ``Runner._submit`` for the same under spawn).

This module imports nothing of imgdl's: it runs before the command line is
parsed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
from multiprocessing.context import BaseContext

#: The start method of the worker processes.
START_METHOD = "forkserver"
#: What the server imports before it forks the first worker: all that a worker
#: runs, and what a worker's start imports besides (the pool's queues and process
#: module when the call arrives, the shared counters and their heap when the context
#: is unpickled, pkgutil and ``launch`` when the child runs the ``imgdl`` script as
#: its main module): 22-26 ms from the pool's request to a worker's first request
#: where it was 26-50 (perf trace, six runs each).
PRELOAD = [
    "downloader.worker",
    "downloader.shardrun",
    "uvloop",
    "concurrent.futures.process",
    "multiprocessing.queues",
    "multiprocessing.sharedctypes",
    "pkgutil",
    "downloader.launch",
]
#: The signals that stop a run: the parent's to handle (exit code 128 + the number;
#: SIGHUP, a closed terminal, unless it was ignored when imgdl started, as by nohup).
#: Blocked in the server, so in every worker until ``worker.init_worker`` ignores them.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def context() -> BaseContext:
    """The multiprocessing context of the workers, its server started (once); the
    ``spawn`` context when no server can be started (see :func:`start`)."""
    start()
    if _no_server is not None:
        return _MaskedSpawnContext()
    return multiprocessing.get_context(START_METHOD)


#: Why the fork server could not be started, if it could not (workers are spawned then).
_no_server: str | None = None


def start() -> None:
    """Launch the fork server now, if it is not running yet; returns at once (the
    server imports in the background; the first worker start waits for it).

    The server listens on a socket in the temporary folder. Where none is usable (a
    read-only root file system with no writable TMPDIR, /tmp or working directory,
    as in a locked-down container), there is no server and the workers are spawned,
    as before the fork server, instead of the run failing at its first line.

    The resource tracker is started first: its own start unblocks SIGINT and SIGTERM
    in this process once it has spawned the tracker (bpo-33613), which would leave
    the server (and every worker) with only SIGHUP blocked.
    """
    global _no_server
    if _no_server is not None:
        return
    multiprocessing.get_context(START_METHOD).set_forkserver_preload(PRELOAD)
    try:
        multiprocessing.resource_tracker.ensure_running()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    except OSError as exc:  # FileNotFoundError: "No usable temporary directory found"
        _no_server = str(exc)


class _MaskedSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker, started with the stop signals blocked (it inherits the mask
    and ignores them before it unblocks them, as a fork of the server does)."""

    def start(self) -> None:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _MaskedSpawnContext(multiprocessing.context.SpawnContext):
    Process = _MaskedSpawnProcess


def reap() -> None:
    """End the server once the pool is shut down, and wait for it.

    Waiting for it makes its CPU time, and its workers' (it reaped them: the pool's
    shutdown waited for their exit statuses, which it reports), count in the
    parent's ``RUSAGE_CHILDREN``, what ``time`` and bench/measure.py read. Left to
    itself, it would exit only after the parent, through an interpreter teardown of
    every preloaded module (40-80 ms that the parent would wait for here). It holds
    nothing of the run (no file, no telemetry), so it is killed.
    """
    server = multiprocessing.forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server._stop()  # type: ignore[attr-defined]  # closes its pipe, waitpid, its socket
