"""Cut the stream of input lines into shards of bounded size.

Invalid lines never reach a worker: they are handed to ``on_invalid`` as soon
as they are read, so the manifest gets them in input order with their line
numbers. Only ``size`` jobs are held at once: memory does not grow with the list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from downloader.outcomes import Job, Outcome


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
    items: Iterable[Job | Outcome],
    size: int,
    journal_dir: Path,
    on_invalid: Callable[[Outcome], None],
) -> Iterator[Shard]:
    batch: list[Job] = []
    shard_id = 0
    for item in items:
        if isinstance(item, Outcome):
            on_invalid(item)
            continue
        batch.append(item)
        if len(batch) >= size:
            yield Shard(shard_id, tuple(batch), journal_dir / f"shard-{shard_id:08d}.jsonl")
            shard_id += 1
            batch = []
    if batch:
        yield Shard(shard_id, tuple(batch), journal_dir / f"shard-{shard_id:08d}.jsonl")
