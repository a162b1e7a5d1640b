"""One shard in a worker: an event loop, the HTTP client, a queue, consumers, a journal.

``worker.run_shard`` runs :class:`ShardRun` under ``asyncio`` (uvloop when it is
installed). Consumers take jobs from a bounded ``asyncio.Queue``; their tasks are
collected through ``asyncio.as_completed``. Each outcome is appended to the
shard's journal as soon as it is known, so that if this process dies the parent
knows exactly which URLs were finished. Kept apart from ``worker`` so that the
parent, which imports ``worker`` for the pool, does not import the download machinery.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from downloader.fetch import Fetcher, RetryLater
from downloader.httpclient import HttpClient
from downloader.imagestage import process_stage
from downloader.limits import Limiter
from downloader.netpolicy import NetworkPolicy
from downloader.outcomes import Job, Outcome, Reason, Status
from downloader.progress import FEED_SECONDS, Feed
from downloader.settings import Settings
from downloader.sharding import Shard
from downloader.storage import Store, write_all
from downloader.telemetry import get_logger, process_telemetry
from downloader.worker import ShardResult, WorkerContext, parent_gone

#: How often a worker looks at the parent's stop flag.
STOP_POLL_SECONDS = 0.1
#: A retry due later than this goes back to the parent (see fetch.RetryLater): a
#: shard ends when its last URL does, and a backoff inside it idled the process.
DEFER_RETRIES_FROM = 0.1


class JournalError(Exception):
    """The shard's journal cannot be written (disk full): the shard cannot go on."""


def _ends_torn(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


class Journal:
    """Append-only outcome log of one shard; each record goes to the OS at once.

    One ``os.write`` of the record's bytes on an ``O_APPEND`` descriptor: the same
    guarantee as a buffered write and a flush (a killed worker's finished records
    are in the file), without the text and buffer layers in between. Records held
    back to be written together (once per turn of the event loop: 31-32 records a
    write at 32 in flight) saved about 2 % of a worker's CPU, and a review of issue
    5 measured what a worker killed with them held loses: 107-207 records in runs
    with 6-8 kills, where a write per record lost 2-3 (images on disk recorded as
    skipped_exists on the next run, or as worker_crashed once the shard's attempts
    ran out). Not worth it.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        if _ends_torn(path):  # a killed attempt's last line: our first record starts anew
            self._append(b"\n")
        self.done: set[tuple[str, int]] = set()
        self.counts: Counter[str] = Counter()
        self.saved_bytes = 0

    def _append(self, data: bytes) -> None:
        try:
            write_all(self._fd, data)
        except OSError as exc:
            raise JournalError(f"cannot write the shard journal: {exc}") from exc

    def write(self, outcome: Outcome) -> None:
        key = (outcome.input, outcome.line)
        if key in self.done:
            return
        self._append(outcome.to_line())
        self.done.add(key)
        self.counts[str(outcome.reason or outcome.status)] += 1
        if outcome.status is Status.SAVED:
            self.saved_bytes += outcome.bytes

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


_client: HttpClient | None = None
#: The output folders this process has made or checked (storage.Store._prepare_dir),
#: kept from shard to shard like the HTTP client.
_checked_dirs: set[str] = set()


def process_client(settings: Settings, policy: NetworkPolicy) -> HttpClient | None:
    """imgdl's own client for direct requests (``http.client: builtin``), one per
    process like the session, its connections kept from shard to shard."""
    global _client
    if settings.http.client != "builtin":
        return None
    if _client is None:
        _client = HttpClient(settings, policy)
    return _client


async def close_process_session() -> None:
    """At the worker's exit: its connections, and aiohttp's sessions if it opened any."""
    if _client is not None:
        await _client.close()
    if "downloader.transport" in sys.modules:
        from downloader.transport import close_sessions

        await close_sessions()


class ShardRun:
    def __init__(self, context: WorkerContext, shard: Shard) -> None:
        self.settings = context.settings
        self.context = context
        self.shard = shard
        self.stopping = asyncio.Event()
        #: jobs whose next try is for a later shard, with its delay in seconds
        self.deferred: list[tuple[Job, float]] = []
        self.log = get_logger(shard=shard.shard_id, attempt=shard.attempt, pid=os.getpid())
        self.telemetry = process_telemetry("worker", context.task_index)
        self.feed = Feed(context.progress)
        self.span: Any = None

    async def run(self) -> ShardResult:
        started = time.monotonic()
        journal = Journal(self.shard.journal)
        self.span = self.telemetry.start_shard(
            self.shard.shard_id, self.shard.attempt, len(self.shard.jobs)
        )
        try:
            self.log.debug("shard started", urls=len(self.shard.jobs))
            await self._run(journal)
            self.log.debug("shard finished", counts=dict(journal.counts))
        finally:
            journal.close()
            self.feed.push(journal.counts, journal.saved_bytes)
            self.telemetry.end_shard(self.span, journal.counts)
            # Each shard's signals leave before its result does: a worker may be
            # killed, or leave without exit hooks, at any time after this.
            self.telemetry.flush()
        return ShardResult(
            shard_id=self.shard.shard_id,
            attempt=self.shard.attempt,
            pid=os.getpid(),
            counts=dict(journal.counts),
            elapsed_s=time.monotonic() - started,
            deferred=tuple(self.deferred),
        )

    async def _run(self, journal: Journal) -> None:
        http = self.settings.http
        consumers_n = max(1, min(http.concurrency, len(self.shard.jobs)))
        queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=2 * consumers_n)
        policy = NetworkPolicy.from_strings(self.settings.network.allow)
        limiter = Limiter(self.settings.limits, self.context.limits)
        fetcher = Fetcher(
            self._store(),
            self.settings,
            limiter if limiter.limits_anything else None,
            policy,
            defer_from=DEFER_RETRIES_FROM,
            stage=process_stage(self.settings, self.context.outdir, self.context.s3 is None),
            client=process_client(self.settings, policy),
        )
        watcher = asyncio.create_task(self._watch_stop(journal))
        producer = asyncio.create_task(self._produce(queue, consumers_n, journal))
        consumers = [
            asyncio.create_task(self._consume(queue, fetcher, journal)) for _ in range(consumers_n)
        ]
        grace = asyncio.create_task(self._enforce_grace([*consumers, producer]))
        tasks = [producer, *consumers]
        try:
            for finished in asyncio.as_completed(tasks):
                try:
                    await finished
                except asyncio.CancelledError:
                    pass
                except JournalError:
                    raise
                except Exception as exc:  # a bug: the task's job is accounted below
                    self.log.error("task failed", error=repr(exc))
        finally:
            for task in [*tasks, watcher, grace]:
                task.cancel()
            await asyncio.gather(*tasks, watcher, grace, return_exceptions=True)
        # Whatever did not get an outcome (cancelled in the grace period, a bug):
        reason = Reason.INTERRUPTED if self.stopping.is_set() else Reason.INTERNAL_ERROR
        later = {(job.input, job.line) for job, _ in self.deferred}
        for job in self.shard.jobs:
            key = (job.input, job.line)
            if key not in journal.done and key not in later:
                journal.write(Outcome.not_saved(job, reason, error="no outcome recorded"))

    def _store(self) -> Store:
        """Where this shard's images go: the output folder, or an s3:// prefix."""
        context = self.context
        # a retried shard may find files its killed attempt put in place
        probe = context.probe_existing or self.shard.attempt > 1
        template = self.settings.output.name_template
        if context.s3 is None:
            return Store(
                context.outdir,
                template,
                probe=probe,
                parts=context.parts_dir,
                checked_dirs=_checked_dirs,
            )
        from downloader.s3store import ObjectStore  # obstore: only for an s3:// output

        return ObjectStore(
            context.s3,
            self.settings.s3,
            context.outdir,
            template,
            probe=probe,
            parts=context.parts_dir,
            index=context.objects_index,
        )

    async def _watch_stop(self, journal: Journal) -> None:
        """Stop when the parent says so, or when the parent is gone (killed with SIGKILL);
        meanwhile, feed the parent's progress display."""
        fed = time.monotonic()
        while not self.context.stop.is_set():
            if parent_gone():
                self.log.warning("parent process is gone; stopping")
                break
            await asyncio.sleep(STOP_POLL_SECONDS)
            if time.monotonic() - fed >= FEED_SECONDS:
                self.feed.push(journal.counts, journal.saved_bytes)
                fed = time.monotonic()
        self.log.info("stop requested; finishing downloads in flight")
        self.stopping.set()

    async def _enforce_grace(self, tasks: list[asyncio.Task[None]]) -> None:
        await self.stopping.wait()
        await asyncio.sleep(self.settings.run.grace_period)
        for task in tasks:
            task.cancel()

    async def _produce(
        self, queue: asyncio.Queue[Job | None], consumers: int, journal: Journal
    ) -> None:
        for job in self.shard.jobs:
            if self.stopping.is_set():
                journal.write(Outcome.not_saved(job, Reason.INTERRUPTED, error="stopped"))
                continue
            await queue.put(job)
        for _ in range(consumers):
            await queue.put(None)

    async def _consume(
        self, queue: asyncio.Queue[Job | None], fetcher: Fetcher, journal: Journal
    ) -> None:
        """Take jobs until the end marker. Only cancellation or a broken journal ends it early."""
        while True:
            job = await queue.get()
            if job is None:
                return
            try:
                start_ns = time.time_ns()
                if self.stopping.is_set():
                    outcome = Outcome.not_saved(job, Reason.INTERRUPTED, error="stopped")
                else:
                    self.telemetry.request_started()
                    try:
                        outcome = await fetcher.fetch(job)
                    finally:
                        self.telemetry.request_ended()
            except RetryLater as later:
                self.deferred.append((later.job, later.delay))
                continue
            except asyncio.CancelledError:
                # the try that was cut counts: it reached the server
                cut = Outcome.not_saved(
                    job, Reason.INTERRUPTED, error="grace period over", attempts=job.tries + 1
                )
                journal.write(cut)
                raise
            except Exception as exc:  # a bug in fetch: this URL fails, the others go on
                outcome = Outcome.not_saved(job, Reason.INTERNAL_ERROR, error=repr(exc))
            journal.write(outcome)
            self.telemetry.url_done(outcome, self.span, start_ns, time.time_ns())
            self.log.debug("url done", url=job.url, status=outcome.status, reason=outcome.reason)
