"""The retry policy: one frozen value you can read, test and log (like urllib3's ``Retry``).

It answers two questions and keeps no state: *should this failure be tried
again?* and *how long to wait first?* The loop that uses it is in ``fetch.py``.
"""

from __future__ import annotations

import dataclasses
import email.utils
import random
import time
from collections.abc import Callable

from downloader.outcomes import Reason
from downloader.settings import RetrySettings

DEFAULT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Failures without an HTTP status that are worth another try.
RETRYABLE_REASONS = frozenset(
    {Reason.TIMEOUT, Reason.CONNECTION_ERROR, Reason.TRUNCATED, Reason.PROTOCOL_ERROR}
)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``attempts`` counts every try, the first included; 1 means never retry.

    The wait before try ``n + 1`` is full jitter: uniform in
    ``[0, min(backoff_max, backoff_base * 2 ** (n - 1))]``; a ``Retry-After``
    header (seconds or an HTTP date) raises it to what the server asked, but
    never above ``retry_after_max``.
    """

    attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    statuses: frozenset[int] = DEFAULT_STATUSES
    reasons: frozenset[Reason] = RETRYABLE_REASONS

    def should_retry(self, attempt: int, reason: Reason, http_status: int | None) -> bool:
        """After try number ``attempt`` failed with ``reason``: is there another try?"""
        if attempt >= self.attempts:
            return False
        if reason is Reason.HTTP_ERROR:
            return http_status in self.statuses
        return reason in self.reasons

    def backoff(
        self, attempt: int, uniform: Callable[[float, float], float] = random.uniform
    ) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return uniform(0.0, ceiling)

    def delay(
        self,
        attempt: int,
        retry_after: str | None = None,
        now: float | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Seconds to wait after failed try ``attempt`` before the next one."""
        wait = self.backoff(attempt, uniform)
        asked = parse_retry_after(retry_after, now) if retry_after else None
        if asked is not None:
            wait = max(wait, min(asked, self.retry_after_max))
        return wait

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            attempts=settings.attempts,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            retry_after_max=settings.retry_after_max,
            statuses=frozenset(settings.statuses),
        )

    def describe(self) -> str:
        statuses = ",".join(str(s) for s in sorted(self.statuses))
        return (
            f"RetryPolicy(attempts={self.attempts}, "
            f"backoff={self.backoff_base}s..{self.backoff_max}s full jitter, "
            f"retry_after_max={self.retry_after_max}s, statuses={statuses})"
        )


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (seconds or HTTP date); None if unreadable."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
