"""The ``imgdl`` entry point: start the workers' fork server, then the command line.

``imgdl fetch`` starts the fork server (``prestart``) before importing the
command line (click, pydantic and the settings: about 0.3 s), so that the
workers' imports and the parent's overlap. Other commands, ``--help`` and
``--dry-run`` start no worker and no server.
"""

from __future__ import annotations

import sys

#: Arguments after which ``fetch`` starts no worker.
_NO_WORKERS = frozenset({"--dry-run", "--help", "-h"})


def wants_workers(args: list[str]) -> bool:
    """Is this a fetch that will start workers? (A wrong guess costs an idle server.)"""
    return bool(args) and args[0] == "fetch" and not _NO_WORKERS.intersection(args)


def main() -> None:
    if wants_workers(sys.argv[1:]):
        from downloader import prestart

        prestart.start()
    from downloader.cli import main as cli_main

    cli_main()
