"""Rate and connection limits that hold for the whole run, across all worker processes.

An ``aiolimiter.AsyncLimiter`` lives in one event loop of one process: N workers
each holding one at rate R send N x R. So the limits that must hold for the run
live in shared memory that the parent creates and hands to every worker:

* **Rates** (``limits.rate`` for the run, ``limits.per_host_rate`` and
  ``limits.hosts`` per host) use GCRA, the "virtual scheduling" form of a token
  bucket: one shared number per bucket, the theoretical arrival time (TAT). A
  request reserves the earliest send time the buckets allow, under one lock, and
  then sleeps until it. Holding the lock takes microseconds; waiting happens in
  the event loop.
* **Connections per host** (``limits.per_host_connections``) are shared
  counters: a download takes a slot before its request and gives it back after.

Hosts map to one of ``SLOTS`` cells by a stable hash; two hosts that share a
cell share its budget, which is stricter than asked, never looser.

Inside each process an ``AsyncLimiter`` at the run's rate sits in front: a
process can never be granted more than the whole run's rate, so it queues its
excess tasks in its own event loop instead of having them reserve send times
far ahead in the shared bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import zlib
from collections.abc import AsyncIterator, Callable
from multiprocessing.context import BaseContext
from multiprocessing.synchronize import Lock
from typing import TYPE_CHECKING, Any

from downloader.settings import LimitsSettings

if TYPE_CHECKING:
    from aiolimiter import AsyncLimiter

SLOTS = 4096
_POLL_MIN, _POLL_MAX = 0.005, 0.05


def host_slot(host: str) -> int:
    return zlib.crc32(host.lower().encode("utf-8", "surrogatepass")) % SLOTS


@dataclasses.dataclass(frozen=True)
class SharedLimits:
    """The shared memory behind the limits; created by the parent, inherited by workers."""

    lock: Lock
    run_tat: Any  # RawValue('d')
    host_tat: Any  # RawArray('d', SLOTS)
    host_connections: Any  # RawArray('i', SLOTS)

    @classmethod
    def create(cls, context: BaseContext) -> SharedLimits:
        return cls(
            lock=context.Lock(),
            run_tat=context.RawValue("d", 0.0),
            host_tat=context.RawArray("d", SLOTS),
            host_connections=context.RawArray("i", SLOTS),
        )

    def reset_after_crash(self) -> None:
        """After the pool died and every worker is gone: free what the dead held.

        Their connection slots are free again, and a worker killed while holding
        the lock (for a few microseconds) would otherwise leave it held forever.
        A multiprocessing Lock can be released by any process, so with no worker
        alive, a lock we cannot take is stale and we release it.
        """
        if not self.lock.acquire(timeout=0.5):
            self.lock.release()
            self.lock.acquire()
        try:
            for i in range(SLOTS):
                self.host_connections[i] = 0
        finally:
            self.lock.release()


def wire_host(host: str) -> str:
    """A host name as requests carry it: ``bücher.example`` and ``xn--bcher-kva.example``
    are one host, so a limit set under either spelling applies to both."""
    from yarl import URL  # the workers' HTTP stack; the parent never calls this

    try:
        return URL.build(scheme="http", host=host).raw_host or host.lower()
    except ValueError:
        return host.lower()


class Limiter:
    """One worker's view of the run's limits."""

    def __init__(self, settings: LimitsSettings, shared: SharedLimits) -> None:
        self.settings = settings
        self.shared = shared
        # A bucket must hold one request at least: below 1/s, one per 1/rate seconds.
        rate = settings.rate
        self.local: AsyncLimiter | None = None
        if rate:
            # imported when a rate is set: aiolimiter loads importlib.metadata for its
            # version, 15-35 ms of every worker's start (issue 5)
            from aiolimiter import AsyncLimiter

            self.local = AsyncLimiter(max(1.0, rate), max(1.0, rate) / rate)
        self._run_interval = 1.0 / settings.rate if settings.rate else 0.0
        self._burst = settings.burst - 1
        self._hosts = {wire_host(host): limits for host, limits in settings.hosts.items()}

    @property
    def limits_anything(self) -> bool:
        """False with no rate, no per-host rate or connection cap and no host overrides:
        the fetcher then skips the limiter altogether."""
        s = self.settings
        return bool(s.rate or s.per_host_rate or s.per_host_connections or s.hosts)

    def host_rate(self, host: str) -> float | None:
        """``host`` as it goes on the wire (``URL.raw_host``: IDNA, lower case)."""
        override = self._hosts.get(host)
        if override is not None and override.rate is not None:
            return override.rate
        return self.settings.per_host_rate

    def host_connections(self, host: str) -> int:
        override = self._hosts.get(host)
        if override is not None and override.connections is not None:
            return override.connections
        return self.settings.per_host_connections

    @contextlib.asynccontextmanager
    async def request(self, host: str) -> AsyncIterator[None]:
        """Hold a connection slot of ``host`` and wait for the request's turn."""
        cell = host_slot(host)
        connections = self.host_connections(host)
        if connections:
            await self._take_connection(cell, connections)
        try:
            if self.local is not None:
                await self.local.acquire()
            await self._wait_turn(cell, self.host_rate(host))
            yield
        finally:
            if connections:
                with self.shared.lock:
                    self.shared.host_connections[cell] -= 1

    async def _take_connection(self, cell: int, limit: int) -> None:
        pause = _POLL_MIN
        while True:
            with self.shared.lock:
                if self.shared.host_connections[cell] < limit:
                    self.shared.host_connections[cell] += 1
                    return
            await asyncio.sleep(pause)
            pause = min(_POLL_MAX, pause * 2)

    async def _wait_turn(self, cell: int, host_rate: float | None) -> None:
        """The host's turn first, then the run's: a slow host must not reserve the run's
        bucket ahead and hold every other host back behind it."""
        if host_rate:
            await self._reserve(
                lambda: self.shared.host_tat[cell],
                lambda v: self.shared.host_tat.__setitem__(cell, v),
                1.0 / host_rate,
            )
        if self._run_interval:
            shared = self.shared
            await self._reserve(
                lambda: shared.run_tat.value,
                lambda v: setattr(shared.run_tat, "value", v),
                self._run_interval,
            )

    async def _reserve(
        self, get: Callable[[], float], put: Callable[[float], None], interval: float
    ) -> None:
        """GCRA: take the earliest send time the bucket allows, then sleep until it."""
        with self.shared.lock:
            now = time.monotonic()
            send = max(now, get() - self._burst * interval)
            put(max(get(), send) + interval)
        if send > now:
            await asyncio.sleep(send - now)
