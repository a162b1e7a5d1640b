"""Request rate limits.

``http.rate`` is requests per second for the whole run. For now each worker
process holds an ``aiolimiter.AsyncLimiter`` at ``rate / processes``: the sum
holds while every process is busy, and is lower when some are idle. (An
AsyncLimiter lives in one event loop of one process; N workers each at the
full rate would send N x the rate.)
"""

from __future__ import annotations

from aiolimiter import AsyncLimiter

from downloader.settings import Settings


def process_limiter(settings: Settings) -> AsyncLimiter | None:
    rate = settings.http.rate
    if rate is None:
        return None
    share = rate / settings.processes
    # A bucket of one second's share, but at least one token: smooth, no big first burst.
    capacity = max(1.0, share)
    return AsyncLimiter(capacity, capacity / share)
