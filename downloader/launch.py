"""The ``imgdl`` entry point: start the workers' fork server, then the command line.

``imgdl fetch`` starts the fork server (``prestart``) before importing the
command line (click, pydantic and the settings: about 0.3 s), so that the
workers' imports and the parent's overlap. Other commands, ``--help`` and
``--dry-run`` start no worker and no server.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

#: Arguments after which ``fetch`` starts no worker.
_NO_WORKERS = frozenset({"--dry-run", "--help", "-h"})


def wants_workers(args: list[str]) -> bool:
    """Is this a fetch that will start workers? (A wrong guess costs an idle server.)"""
    return bool(args) and args[0] == "fetch" and not _NO_WORKERS.intersection(args)


def main() -> None:
    # pydantic looks for plugins of its own (entry points) when the first model is
    # validated: a read of every installed package's metadata, 10-20 ms of the
    # start-up, for a hook that instruments an application's models, none of which
    # imgdl has. Set before any import of pydantic, here and in the workers.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if wants_workers(sys.argv[1:]):
        from downloader import prestart

        prestart.start()
    from downloader import cli

    try:
        cli.main()
    except SystemExit as done:
        if cli.fetch_finished and isinstance(done.code, int):
            leave_now(done.code)
        raise


def leave_now(code: int) -> None:
    """Exit without tearing the interpreter down, once a fetch has finished.

    Freeing every object and module of a process that loaded pydantic, click and
    the rest takes 60-90 ms, after the summary is out and the exit code known.
    What the teardown would do that matters is done here: the exit hooks
    (multiprocessing's clean-up, logging, OpenTelemetry's own) and the flush of
    stdout and stderr. Every file of the run is closed by then; a thread that is
    not a daemon (none is expected) gets the normal exit, which waits for it.
    """
    main = threading.main_thread()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not main):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
