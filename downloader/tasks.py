"""Which slice of the input this task takes, when an orchestrator runs many of them.

A Kubernetes indexed Job, an AWS Batch array job or a Cloud Run job starts N
copies of one container, each with its index in an environment variable; each
reads the same list and keeps the lines whose URL hashes to its index. The hash
is of the URL (sha256, as the duplicate check's), so the same URL always lands
in the same task and its duplicates are found there; N tasks cover every line
exactly once, whatever order they run in, with no coordination.

Each task keeps its records in ``OUTDIR/tasks/task-IIIII-of-NNNNN/``; the
images themselves go to ``OUTDIR`` as in a run of one. ``imgdl merge`` joins the
records (see :mod:`downloader.merge`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

from downloader.errors import ConfigError
from downloader.settings import LimitsSettings, Settings
from downloader.state import TASKS_DIR

__all__ = ["TASKS_DIR", "TaskSlice", "resolve", "task_name"]

#: (index variable, count variables) of each orchestrator, in the order they are tried.
#: Kubernetes gives no count: set IMGDL_RUN_SHARD_COUNT to the Job's completions.
#: AWS Batch gives no size either: set AWS_BATCH_JOB_ARRAY_SIZE (or
#: IMGDL_RUN_SHARD_COUNT) in the job definition to the array size.
ORCHESTRATORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("JOB_COMPLETION_INDEX", ()),
    ("AWS_BATCH_JOB_ARRAY_INDEX", ("AWS_BATCH_JOB_ARRAY_SIZE",)),
    ("CLOUD_RUN_TASK_INDEX", ("CLOUD_RUN_TASK_COUNT",)),
)


@dataclasses.dataclass(frozen=True)
class TaskSlice:
    index: int
    count: int
    #: where the index came from, for messages and the summary
    source: str = "flags"

    @property
    def name(self) -> str:
        return task_name(self.index, self.count)

    def takes(self, url: str) -> bool:
        digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def limits(self, limits: LimitsSettings) -> LimitsSettings:
        """This task's share of limits meant for the whole job: rates are divided by
        the number of tasks; connections too, but at least one per host."""
        n = self.count

        def rate(value: float | None) -> float | None:
            return None if value is None else value / n

        def connections(value: int | None) -> int | None:
            return value if not value else max(1, value // n)

        return limits.model_copy(
            update={
                "rate": rate(limits.rate),
                "per_host_rate": rate(limits.per_host_rate),
                "per_host_connections": connections(limits.per_host_connections),
                "hosts": {
                    host: one.model_copy(
                        update={"rate": rate(one.rate), "connections": connections(one.connections)}
                    )
                    for host, one in limits.hosts.items()
                },
            }
        )


def task_name(index: int, count: int) -> str:
    return f"task-{index:05d}-of-{count:05d}"


def _integer(name: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None
    if number < 0:
        raise ConfigError(f"{name}={value!r} is negative")
    return number


def resolve(settings: Settings, env: Mapping[str, str] = os.environ) -> TaskSlice | None:
    """This task's slice, from ``run.shard_index/shard_count`` (flags, ``IMGDL_RUN_*``,
    YAML) or else the orchestrator's variables; None when the run is not split."""
    index, count = settings.run.shard_index, settings.run.shard_count
    source = "run.shard_index"
    if index is None:
        for variable, count_variables in ORCHESTRATORS:
            if env.get(variable, "").strip():
                index, source = _integer(variable, env[variable]), variable
                if count is None:
                    for count_variable in count_variables:
                        if env.get(count_variable, "").strip():
                            count = _integer(count_variable, env[count_variable])
                            break
                break
    if index is None and count is None:
        return None
    if index is None:
        raise ConfigError(
            f"run.shard_count is {count} but this task's index is not set: pass "
            "--shard-index (or IMGDL_RUN_SHARD_INDEX), or run under an orchestrator that "
            "sets JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX or CLOUD_RUN_TASK_INDEX"
        )
    if count is None:
        where = {
            "JOB_COMPLETION_INDEX": "IMGDL_RUN_SHARD_COUNT to the Job's completions",
            "AWS_BATCH_JOB_ARRAY_INDEX": "AWS_BATCH_JOB_ARRAY_SIZE to the array size",
        }.get(source, "--shard-count or IMGDL_RUN_SHARD_COUNT")
        raise ConfigError(f"{source} is {index} but the number of tasks is not set: set {where}")
    if count < 1 or index >= count:
        raise ConfigError(
            f"{source} is {index}, outside 0..{count - 1} for {count} tasks: the index "
            "counts from 0 and must be below the number of tasks"
        )
    return None if count == 1 else TaskSlice(index, count, source)
