"""Cut the stream of input lines into shards of bounded size.

Invalid lines never reach a worker: they are handed to ``on_invalid`` as soon
as they are read. Only ``size`` jobs are held at once: memory does not grow with
the list. A slow input (a pipe that yields a URL now and then) still makes
progress: a partial shard goes out once its first job has waited ``linger``
seconds. The stream may carry ``TICK`` markers (the reader had nothing new);
``Cutter`` answers each with ``None`` ("no shard ready yet") so that its caller
gets control back and can notice a signal.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from downloader.outcomes import Job, Outcome


class Tick:
    def __repr__(self) -> str:
        return "TICK"


#: Marker in the input stream: nothing new was read for a while.
TICK: Final = Tick()


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """A batch of jobs for one worker call, and the journal its outcomes go to."""

    shard_id: int
    jobs: tuple[Job, ...]
    journal: Path
    attempt: int = 1

    def retry(self, remaining: tuple[Job, ...]) -> Shard:
        return dataclasses.replace(self, jobs=remaining, attempt=self.attempt + 1)


class Cutter:
    """Iterate to get shards; ``pending`` holds the jobs of the shard being filled."""

    def __init__(
        self,
        items: Iterable[Job | Outcome | Tick],
        size: int,
        journal_dir: Path,
        on_invalid: Callable[[Outcome], None],
        linger: float = 2.0,
        run_token: str = "",
    ) -> None:
        self.items = items
        self.size = size
        self.journal_dir = journal_dir
        self.on_invalid = on_invalid
        self.linger = linger
        self.prefix = f"shard-{run_token}-" if run_token else "shard-"
        self.pending: list[Job] = []
        self._next_id = 0

    def _emit(self) -> Shard:
        shard = self.shard_of(self.pending)
        self.pending = []
        return shard

    def shard_of(self, jobs: list[Job]) -> Shard:
        """A shard of these jobs, numbered after the others (retries use it too)."""
        shard_id = self._next_id
        self._next_id += 1
        journal = self.journal_dir / f"{self.prefix}{shard_id:08d}.jsonl"
        return Shard(shard_id, tuple(jobs), journal)

    def __iter__(self) -> Iterator[Shard | None]:
        first_at = 0.0
        for item in self.items:
            if isinstance(item, Tick):
                if self.pending and time.monotonic() - first_at >= self.linger:
                    yield self._emit()
                else:
                    yield None
                continue
            if isinstance(item, Outcome):
                self.on_invalid(item)
                continue
            if not self.pending:
                first_at = time.monotonic()
            self.pending.append(item)
            if len(self.pending) >= self.size:
                yield self._emit()
        if self.pending:
            yield self._emit()
