"""Process-tree facts from Linux ``/proc``, for the tests and the benchmarks.

imgdl itself does not use this; it lives in the package so that tests and
``bench/`` share one copy.
"""

from __future__ import annotations

from pathlib import Path


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children = _parents()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def workers(pid: int) -> list[int]:
    """The pool workers of an imgdl parent, without multiprocessing's helpers: the
    children of its fork server (a worker is forked from there and has the server's
    command line), or its own children under ``spawn``."""
    children = _parents()
    found = []
    for child in children.get(pid, []):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.forkserver" in cmdline:
            found.extend(children.get(child, []))
        elif b"resource_tracker" not in cmdline:
            found.append(child)
    return found


def running(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie waiting to be reaped)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def rss_kib(pid: int) -> int:
    """Resident memory of one process, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
