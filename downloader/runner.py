"""The parent process: shards in, process pool, outcomes out.

It reads the inputs lazily, keeps at most ``shards_in_flight`` shards
submitted to a ``ProcessPoolExecutor`` (so memory is bounded by configuration,
not by the list), and merges each finished shard's journal into the report.

A worker that dies (SIGKILL, out of memory) breaks the whole pool: every
pending future fails with ``BrokenProcessPool``. We then build a new pool and
resubmit each in-flight shard's *unfinished* URLs (known from its journal);
a shard that has used up ``run.shard_attempts`` records them as
``worker_crashed`` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import multiprocessing
import os
import secrets
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import structlog

from downloader import contentindex, objstore, packer, prestart, sharding
from downloader.dedupe import Duplicates
from downloader.errors import ImgdlError
from downloader.limits import SharedLimits
from downloader.outcomes import Job, Outcome, Reason
from downloader.prestart import STOP_SIGNALS
from downloader.progress import Progress, SharedCounters, count_lines
from downloader.report import RunReport, write_summary
from downloader.settings import Settings
from downloader.sharding import Shard, Tick
from downloader.sources import InputList, read_in_background
from downloader.state import (
    ARCHIVE_DIR,
    FAILURES,
    MANIFEST,
    STATE_DIR,
    SUMMARY,
    TASKS_DIR,
    LineSet,
    RunState,
    Validators,
    read_raw,
)
from downloader.storage import case_insensitive, names_may_collide
from downloader.tasks import TaskSlice
from downloader.telemetry import active_telemetry, get_logger
from downloader.transform import require_pillow as require_pillow_for_images
from downloader.validate import require_pillow
from downloader.worker import (
    ShardResult,
    WorkerContext,
    init_worker,
    run_shard,
)

log = get_logger()
#: How often the parent wakes up to notice a signal while waiting on workers.
POLL_SECONDS = 0.2


class _Lines:
    """The input stream as the parent sees it: counted, with lines done earlier left out."""

    def __init__(
        self,
        items: Iterator[Job | Outcome | Tick],
        done: LineSet,
        duplicates: Duplicates,
        validators: Validators | None = None,
        takes: Callable[[str], bool] | None = None,
    ) -> None:
        """``takes``: which URLs are this task's, when the job is split (tasks.py)."""
        self._validators = validators
        self._takes = takes
        self._items = items
        self._done = done
        self._duplicates = duplicates
        self.count = 0
        self.carried = 0
        self.exhausted = False
        self.last_line: dict[str, int] = {}

    def __iter__(self) -> Iterator[Job | Outcome | Tick]:
        done = self._done
        for item in self._items:
            if isinstance(item, Tick):
                yield item
                continue
            if self._takes is not None and not self._takes(item.url):
                continue  # another task's line
            self.count += 1
            self.last_line[item.input] = item.line
            if done and (item.input, item.line) in done:  # (a first run: none done)
                again = self._revalidation(item)
                if again is None:
                    self.carried += 1
                    if isinstance(item, Job):
                        self._duplicates.claim_name(item)
                    continue
                item = again
            if isinstance(item, Job) and not self._duplicates.admit(item):
                continue
            yield item
        self.exhausted = True

    def _revalidation(self, item: Job | Outcome) -> Job | None:
        """The job that asks the server again about a line done earlier, if we may."""
        if self._validators is None or not isinstance(item, Job):
            return None
        found = self._validators.get(item.input, item.line)
        if found is None:
            return None
        etag, modified, path = found
        return dataclasses.replace(item, etag=etag, last_modified=modified, previous_path=path)


class Runner:
    def __init__(
        self, settings: Settings, inputs: list[InputList], task: TaskSlice | None = None
    ) -> None:
        if task is not None:  # limits are the whole job's: this task takes its share
            settings = settings.model_copy(update={"limits": task.limits(settings.limits)})
        self.settings = settings
        self.inputs = inputs
        self.task = task
        output = settings.output.dir
        #: an s3:// output: the images go there, the records stay in a local folder
        #: (journals, segments and SQLite need appends) and are uploaded at the end
        self.target = objstore.parse(output) if objstore.is_s3(output) else None
        if self.target is not None:
            local = settings.s3.state_dir or objstore.default_state_dir(self.target)
        else:
            local = Path(output)
        #: the images' folder (for an s3:// output, the local state folder), as given
        self.local_dir = local
        self.outdir = local.resolve()
        #: the records' folder: manifest, failures, summary, state
        self.records_dir = self.outdir / TASKS_DIR / task.name if task else self.outdir
        #: what an s3:// prefix held when the run began (see objstore.ObjectIndex)
        self._objects: objstore.IndexReader | None = None
        self._objects_path = self.records_dir / STATE_DIR / f"objects-{os.getpid()}.sqlite"
        #: webdataset / parquet: the workers stage the images, the packer shards them
        form = settings.output
        self.packer = (
            packer.Packer(form.format, form.shard_samples, self.records_dir)
            if form.format != packer.FILES
            else None
        )
        exists = self._object_exists if self.target is not None else None
        self.state = RunState(
            self.records_dir,
            images=self.outdir,
            exists=self.packer.exists if self.packer is not None else exists,
        )
        self._mp = prestart.context()  # started already by `imgdl fetch` (launch.py)
        self._stop = self._mp.Event()
        self._limits = SharedLimits.create(self._mp)
        self._counters = SharedCounters(self._mp)
        self._signal_exit: int | None = None
        self._reader_errors: list[str] = []
        #: failed jobs waiting for their next try: (due, sequence, job), earliest first
        self._later: list[tuple[float, int, Job]] = []
        self._later_seq = 0
        self._abort = False
        self._probe_existing = True

    # -- signals -------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: types.FrameType | None) -> None:
        if self._signal_exit is not None and signum == signal.SIGINT:
            self._abort = True  # Ctrl-C while stopping: stop now, not after the grace period
            return
        if self._signal_exit is None:
            self._signal_exit = 128 + signum  # 130 SIGINT, 143 SIGTERM, 129 SIGHUP
            log.warning(
                "signal received: finishing downloads in flight",
                signal=signal.Signals(signum).name,
                grace_s=self.settings.run.grace_period,
            )
        self._stop.set()

    # -- the run -------------------------------------------------------------

    def _unread_failures(self, lines: _Lines) -> Iterator[str]:
        """URLs of OUTDIR/failures.txt, given as an input, that this run did not reach.

        That file is replaced at the end of the run; without this, a retry that was
        stopped would drop what it had not read yet from the retry cycle.
        """
        own = os.path.realpath(self.records_dir / FAILURES)
        for item in self.inputs:
            if item.path == "-" or os.path.realpath(item.path) != own:
                continue
            after = lines.last_line.get(item.label, 0)
            with open(item.path, encoding="utf-8", errors="replace") as handle:
                for number, text in enumerate(handle, start=1):
                    url = text.strip()
                    if number > after and url and not url.startswith("#"):
                        yield url

    @property
    def records_location(self) -> objstore.S3Location | None:
        """Where the records of an s3:// output are uploaded: the prefix, or a task's
        folder below it."""
        if self.target is None:
            return None
        return self.target.below(f"{TASKS_DIR}/{self.task.name}") if self.task else self.target

    def _object_exists(self, relpath: str) -> bool:
        return self._objects is not None and relpath in self._objects

    def _open_bucket(self) -> bool:
        """An s3:// output: get the records back if the local state folder is new, and
        list the prefix. True if it held images."""
        assert self.target is not None and self.records_location is not None
        store = objstore.open_store(self.target.bucket, self.settings.s3)
        restored = objstore.restore_records(store, self.records_location, self.records_dir)
        if restored:
            log.info("records restored from the bucket", names=restored, to=str(self.records_dir))
        self._objects_path.parent.mkdir(parents=True, exist_ok=True)
        index = objstore.ObjectIndex(self._objects_path).build(store, self.target)
        self._objects = objstore.IndexReader(self._objects_path)
        log.info("listed the output prefix", url=self.target.url, images=index.images)
        return index.images > 0

    def _close_bucket(self) -> None:
        if self._objects is None:
            return
        self._objects.close()
        self._objects = None
        self._objects_path.unlink(missing_ok=True)

    def upload(self, names: tuple[str, ...] | None = None) -> list[str]:
        """Upload the records of an s3:// output (``names``: only those); their URLs."""
        location = self.records_location
        assert self.target is not None and location is not None
        store = objstore.open_store(self.target.bucket, self.settings.s3)
        return objstore.upload_records(store, location, self.records_dir, names)

    def _publish(self, summary: dict[str, Any]) -> None:
        """Upload the records of an s3:// output. A failed upload leaves them in the
        local folder (the next run of the same command uploads them) and makes the exit
        code 1."""
        try:
            sent = self.upload()
        except ImgdlError as exc:
            log.error("records not uploaded", error=str(exc))
            if summary["exit_code"] == 0:
                summary["exit_code"] = 1
                write_summary(self.records_dir, summary)
            return
        log.info("records uploaded", to=sent)

    def _settle_content(self) -> None:
        """dedupe.content: settle the claims a killed run left (contentindex.settle)."""
        dedupe = self.settings.dedupe
        if dedupe.content == "off":
            return
        db = self.outdir / contentindex.CONTENT_DB
        if self.packer is not None:  # staged, or packed into a shard
            db, exists = packer.content_db_beside(self.packer.staging), self.packer.exists
        elif self.target is not None:
            exists = self._object_exists
        else:
            exists = lambda relpath: (self.outdir / relpath).is_file()  # noqa: E731
        near = dedupe.max_distance if dedupe.content == "perceptual" else None
        settled = contentindex.settle(db, near, exists)
        if any(settled.values()):
            log.info("content index settled", **settled)

    def _open_state(self) -> LineSet:
        try:
            self.records_dir.mkdir(parents=True, exist_ok=True)
            own = {STATE_DIR, ARCHIVE_DIR, TASKS_DIR, MANIFEST, FAILURES, SUMMARY}
            if self.target is not None:
                empty = self.task is None and not self._open_bucket()
            else:  # the other tasks of a split job write beside this one
                empty = self.task is None and not any(
                    entry.name not in own for entry in os.scandir(self.outdir)
                )
            output = self.settings.output
            self._probe_existing = not empty or names_may_collide(
                output.name_template, self.settings.input.name_column
            )
            done = self.state.open(
                [i.label for i in self.inputs],
                revalidate=self.settings.run.revalidate,
                known={i.label: i.fingerprint for i in self.inputs if i.fingerprint},
            )
            if self.packer is not None:
                self.packer.start()
                # a killed run's images wait in the staging folder: pack them first,
                # and let the workers look for them there
                self._probe_existing = self._probe_existing or self.packer.has_staged()
                self.packer.pack_leftovers(self.state.raw_records())
            return done
        except OSError as exc:
            where = exc.filename or self.outdir
            raise ImgdlError(
                f"cannot write to the output folder {self.outdir} ({where}): {exc.strerror or exc}"
            ) from None

    def run(self) -> tuple[int, dict[str, Any]]:
        require_pillow(self.settings.validate_)
        require_pillow_for_images(self.settings)
        packer.check(self.settings, s3_output=self.target is not None)
        if self.target is None:
            packer.check_folder(self.settings.output.format, self.records_dir)
        image = self.settings.image
        if image.resize_mode == "no" and image.size != type(image).model_fields["size"].default:
            log.warning(
                "image.size has no effect while image.resize_mode is no: images keep their "
                "pixels (set --resize-mode keep_ratio, center_crop or border)",
                size=image.size,
            )
        if not self.settings.tls.verify:
            log.warning(
                "TLS verification is OFF (tls.verify: false): any server can impersonate any host"
            )
        # folders this run would create for an s3:// output's local state
        folders = [self._objects_path.parent, self.records_dir, *self.records_dir.parents]
        made = [folder for folder in folders if not folder.exists()]
        try:
            done = self._open_state()
        except BaseException:
            self._close_bucket()
            if self.packer is not None:
                self.packer.close()
            self.state.unlock()
            if self.target is not None:  # a bucket not reached leaves no empty folders
                for folder in made:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            raise
        if self.state.archived is not None:
            log.warning(
                "the output folder held the records of other inputs: moved them aside",
                to=str(self.state.archived),
            )
        self._settle_content()
        report = RunReport(self.state)
        structlog.contextvars.bind_contextvars(role="parent")
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in STOP_SIGNALS
            if signal.getsignal(sig) is not signal.SIG_IGN
        }
        report.duplicates = Duplicates.for_run(
            self.state.dir / "dedupe.sqlite",
            report.record,
            self.settings,
            # object keys are case-sensitive
            case_blind=lambda: self.target is None and case_insensitive(self.outdir),
        )
        reader = read_in_background(
            self.inputs, buffered=2 * self.settings.run.shard_size, poll=POLL_SECONDS
        )
        lines = _Lines(
            reader,
            done,
            report.duplicates,
            self.state.validators,
            takes=self.task.takes if self.task else None,
        )
        progress = self._start_progress(report, lines)
        self._tell_own_outcomes(report, progress)
        log.info(
            "run started",
            inputs=[i.label for i in self.inputs],
            outdir=str(self.outdir),
            task=self.task.name if self.task else None,
            processes=self.settings.processes,
            concurrency=self.settings.http.concurrency,
            already_done=len(done),
        )
        try:
            cutter = sharding.Cutter(
                lines,
                self.settings.run.shard_size,
                self.state.journal_dir,
                report.record,
                linger=self.settings.run.shard_linger,
                run_token=secrets.token_hex(4),  # a killed run's journals never clash
            )
            self._drive(cutter, report)
            prestart.reap()
            for job in cutter.pending:  # read, but the run stopped before sending them
                report.record(Outcome.not_saved(job, Reason.INTERRUPTED, error="stopped"))
            for _, _, job in self._later:  # failed once at least; stopped before a retry
                why = "stopped before its retry"  # attempts: its tries, as for any job
                report.record(Outcome.not_saved(job, Reason.INTERRUPTED, error=why))
            input_errors = [i.error for i in self.inputs if i.error] + self._reader_errors
            complete = lines.exhausted and not input_errors
            shards = (
                self.packer.finish(complete and self._signal_exit is None)
                if self.packer is not None
                else None
            )
            summary = report.finish(
                self._signal_exit,
                lines.count,
                lines.carried,
                complete,
                input_errors,
                unread=() if complete else self._unread_failures(lines),
                task=dataclasses.asdict(self.task) if self.task else None,
                shards=shards,
            )
            if self.target is not None:
                self._publish(summary)
        except OSError as exc:  # our own records cannot be written: disk full, gone
            raise ImgdlError(
                f"cannot write the run's records in {self.records_dir}: {exc.strerror or exc}; "
                "free the space and run the same command again to finish"
            ) from None
        finally:
            if progress is not None:
                progress.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for item in self.inputs:
                item.close()
            self._close_bucket()
            if self.packer is not None:
                self.packer.close()
            self.state.unlock()
        log.info(
            "run finished",
            exit_code=summary["exit_code"],
            lines=summary["lines"],
            saved=summary["saved"],
            skipped=summary["skipped"],
            failed=summary["failed"],
            elapsed_s=summary["elapsed_s"],
        )
        if summary["lines"] < lines.count:  # invariant 1; a bug if it ever fires
            log.error("fewer records than lines read", records=summary["lines"], lines=lines.count)
        return summary["exit_code"], summary

    def _start_progress(self, report: RunReport, lines: _Lines) -> Progress | None:
        if not self.settings.log.progress:
            return None
        paths = [item.path for item in self.inputs]
        progress = Progress(
            self._counters,
            terminal=sys.stderr.isatty(),
            interval=self.settings.log.progress_interval,
            lines=lambda: (lines.carried, lines.count if lines.exhausted else None),
            estimate=functools.partial(count_lines, paths, self.task.count if self.task else 1),
        )
        return progress.start()

    @staticmethod
    def _tell_own_outcomes(report: RunReport, progress: Progress | None) -> None:
        """The outcomes the parent makes itself (invalid lines, duplicates, lines stopped
        before they were sent) reach the progress display and the outcome metric, which
        the workers feed with theirs."""
        telemetry = active_telemetry()
        hooks = [
            hook
            for hook in (
                progress.record if progress else None,
                telemetry.count if telemetry and telemetry.enabled else None,
            )
            if hook is not None
        ]

        def tell(outcome: Outcome) -> None:
            for hook in hooks:
                hook(outcome)

        if hooks:
            report.on_own_outcome = tell

    def _new_pool(self) -> ProcessPoolExecutor:
        context = WorkerContext(
            settings=self.settings,
            outdir=self.packer.staging if self.packer is not None else self.outdir,
            stop=self._stop,
            limits=self._limits,
            probe_existing=self._probe_existing,
            progress=self._counters,
            parts_dir=self.state.parts_dir,
            task_index=self.task.index if self.task else None,
            s3=self.target,
            objects_index=self._objects_path if self._objects is not None else None,
        )
        return ProcessPoolExecutor(
            max_workers=self.settings.processes,
            mp_context=self._mp,
            initializer=init_worker,
            initargs=(context,),
        )

    def _next_shard(self, shards: Iterator[Shard | None]) -> Shard | bool | None:
        """The next shard; None if none is ready yet; False once the input is over."""
        try:
            return next(shards, False)
        except Exception as exc:  # a bug while reading: stop reading, finish what runs
            log.error("reading the input failed", error=repr(exc))
            self._reader_errors.append(f"reading the input failed: {exc!r}")
            return False

    def _submit(self, pool: ProcessPoolExecutor, shard: Shard) -> Future[ShardResult]:
        """Submit a shard. A worker this starts is forked from the fork server, whose
        SIGINT/SIGTERM/SIGHUP are blocked (prestart): it ignores them before it unblocks
        them, so a Ctrl-C cannot hit it mid-start-up."""
        return pool.submit(run_shard, shard)

    def _due_retries(self, cutter: sharding.Cutter) -> Shard | None:
        """A shard of the deferred jobs whose retry is due, if any."""
        now = time.monotonic()
        due: list[Job] = []
        while self._later and self._later[0][0] <= now and len(due) < self.settings.run.shard_size:
            due.append(heapq.heappop(self._later)[2])
        return cutter.shard_of(due) if due else None

    @property
    def _retries_full(self) -> bool:
        """As many jobs wait for a retry as the run has downloads in flight: read no new
        input until some are sent. Before, a job waited in its consumer, so at most that
        many waited, and a host that answers 429 to everything got no more new work
        than that; this keeps the bound, for politeness and for the parent's memory."""
        return len(self._later) >= self.settings.http.concurrency * self.settings.processes

    def _defer(self, deferred: tuple[tuple[Job, float], ...]) -> None:
        now = time.monotonic()
        for job, delay in deferred:
            self._later_seq += 1
            heapq.heappush(self._later, (now + delay, self._later_seq, job))

    def _drive(self, cutter: sharding.Cutter, report: RunReport) -> None:
        shards = iter(cutter)
        original: dict[int, Shard] = {}
        inflight: dict[Future[ShardResult], Shard] = {}
        reading = True
        pool = self._new_pool()
        try:
            while True:
                while self._signal_exit is None and len(inflight) < self.settings.shards_in_flight:
                    shard: Shard | bool | None = self._due_retries(cutter)
                    if shard is None and reading and not self._retries_full:
                        shard = self._next_shard(shards)
                        if shard is False:
                            reading = False
                    if not isinstance(shard, Shard):
                        break
                    original[shard.shard_id] = shard
                    try:
                        inflight[self._submit(pool, shard)] = shard
                    except (BrokenProcessPool, RuntimeError):  # it broke since the last wait
                        pool, inflight = self._recover(
                            pool, [*inflight.values(), shard], original, report
                        )
                stopping = self._signal_exit is not None
                if not inflight and (stopping or (not reading and not self._later)):
                    return
                if not inflight:
                    if not reading or self._retries_full:  # only retries to send, none due
                        time.sleep(
                            min(POLL_SECONDS, max(0.0, self._later[0][0] - time.monotonic()))
                        )
                    continue  # the input is slow: nothing to wait for yet
                if self._abort:
                    self._abort_now(pool, inflight, original, report)
                    return
                done, _ = wait(inflight, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    shard = inflight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        inflight[future] = shard  # handled with the others below
                        continue
                    except Exception as exc:  # the worker failed (journal unwritable, a bug)
                        log.error("shard failed", shard=shard.shard_id, error=repr(exc))
                        self._close_shard(
                            original.pop(shard.shard_id),
                            report,
                            Reason.INTERNAL_ERROR,
                            f"worker error: {exc!r}",
                        )
                        continue
                    log.debug(
                        "shard done",
                        shard=result.shard_id,
                        counts=result.counts,
                        elapsed_s=round(result.elapsed_s, 2),
                        deferred=len(result.deferred),
                    )
                    self._defer(result.deferred)
                    self._close_shard(
                        original.pop(shard.shard_id),
                        report,
                        Reason.INTERNAL_ERROR,
                        "no outcome recorded by the worker",
                        later=frozenset((job.input, job.line) for job, _ in result.deferred),
                    )
                if broken:
                    pool, inflight = self._recover(pool, list(inflight.values()), original, report)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _abort_now(
        self,
        pool: ProcessPoolExecutor,
        inflight: dict[Future[ShardResult], Shard],
        original: dict[int, Shard],
        report: RunReport,
    ) -> None:
        """Kill the workers; what they journaled stands, the rest is interrupted. Files
        being written were part files, so nothing partial stands at a final path."""
        log.warning("SIGINT while stopping: aborting now")
        for process in multiprocessing.active_children():
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        for shard in inflight.values():
            self._close_shard(
                original.pop(shard.shard_id),
                report,
                Reason.INTERRUPTED,
                "aborted by SIGINT while stopping",
            )

    def _rebuild(self, pool: ProcessPoolExecutor) -> ProcessPoolExecutor:
        """A worker died: end the survivors now (they ignore the pool's SIGTERM and would
        finish their shards first), and start a new pool."""
        for process in multiprocessing.active_children():
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
        self._limits.reset_after_crash()
        return self._new_pool()

    def _recover(
        self,
        pool: ProcessPoolExecutor,
        shards: list[Shard],
        original: dict[int, Shard],
        report: RunReport,
    ) -> tuple[ProcessPoolExecutor, dict[Future[ShardResult], Shard]]:
        """A worker died: new pool, then retry or give up on each shard that was in flight.
        If the new pool breaks while we submit to it, the same again (bounded)."""
        for _ in range(self.settings.run.shard_attempts + 3):
            pool = self._rebuild(pool)
            retry = self._decide(shards, original, report)
            inflight: dict[Future[ShardResult], Shard] = {}
            try:
                for shard in retry:
                    inflight[self._submit(pool, shard)] = shard
                return pool, inflight
            except (BrokenProcessPool, RuntimeError):
                shards = retry
        for shard in shards:
            self._close_shard(
                original.pop(shard.shard_id),
                report,
                Reason.WORKER_CRASHED,
                "worker processes kept dying at start",
            )
        return self._rebuild(pool), {}

    def _decide(
        self, shards: list[Shard], original: dict[int, Shard], report: RunReport
    ) -> list[Shard]:
        """The shards to run again (with what is left of them); the others are closed."""
        retry: list[Shard] = []
        for shard in shards:
            if not shard.journal.exists():  # never started: not its fault, same attempt
                retry.append(shard)
                continue
            journaled = _journaled(shard.journal)
            remaining = tuple(j for j in shard.jobs if (j.input, j.line) not in journaled)
            if (
                remaining
                and shard.attempt < self.settings.run.shard_attempts
                and self._signal_exit is None
            ):
                log.warning(
                    "worker died; retrying shard",
                    shard=shard.shard_id,
                    attempt=shard.attempt + 1,
                    remaining=len(remaining),
                )
                retry.append(shard.retry(remaining))
                continue
            reason = Reason.INTERRUPTED if self._signal_exit else Reason.WORKER_CRASHED
            log.error(
                "worker died; giving up on shard",
                shard=shard.shard_id,
                attempts=shard.attempt,
                unfinished=len(remaining),
            )
            self._close_shard(
                original.pop(shard.shard_id),
                report,
                reason,
                f"worker process died ({shard.attempt} attempts)",
            )
        return retry

    def _close_shard(
        self,
        shard: Shard,
        report: RunReport,
        missing: Reason,
        error: str,
        later: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        """Record the shard's outcomes; the jobs in ``later`` get theirs from a retry."""
        jobs = [j for j in shard.jobs if (j.input, j.line) not in later] if later else shard.jobs
        journaled = _journaled(shard.journal)
        report.merge(jobs, journaled, missing, error)
        if self.packer is not None:  # after the records: a sample's .json is its record
            self.packer.offer_records(
                journaled[(j.input, j.line)] for j in jobs if (j.input, j.line) in journaled
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shard.journal)


def _journaled(path: Path) -> dict[tuple[str, int], tuple[dict[str, Any], str]]:
    """The records a worker journaled for a shard, decoded, with their text, by (input,
    line). No Outcome is built: the merge needs one only for a 304 (report.merge)."""
    found: dict[tuple[str, int], tuple[dict[str, Any], str]] = {}
    for raw, text in read_raw(path):
        found.setdefault((raw["input"], raw["line"]), (raw, text))
    return found
