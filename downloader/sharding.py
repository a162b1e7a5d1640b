"""Cut the stream of input lines into shards of bounded size.

Invalid lines never reach a worker: they are handed to ``on_invalid`` as soon
as they are read. Only ``size`` jobs are held at once: memory does not grow with
the list. A slow input (a pipe that yields a URL now and then) still makes
progress: a partial shard goes out once its first job has waited ``linger``
seconds. The stream may carry ``TICK`` markers (the reader had nothing new);
``cut`` answers each with ``None`` ("no shard ready yet") so that its caller
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


def cut(
    items: Iterable[Job | Outcome | Tick],
    size: int,
    journal_dir: Path,
    on_invalid: Callable[[Outcome], None],
    linger: float = 2.0,
) -> Iterator[Shard | None]:
    batch: list[Job] = []
    shard_id = 0
    first_at = 0.0

    def emit() -> Shard:
        nonlocal batch, shard_id
        shard = Shard(shard_id, tuple(batch), journal_dir / f"shard-{shard_id:08d}.jsonl")
        shard_id += 1
        batch = []
        return shard

    for item in items:
        if isinstance(item, Tick):
            if batch and time.monotonic() - first_at >= linger:
                yield emit()
            else:
                yield None
            continue
        if isinstance(item, Outcome):
            on_invalid(item)
            continue
        if not batch:
            first_at = time.monotonic()
        batch.append(item)
        if len(batch) >= size:
            yield emit()
    if batch:
        yield emit()
