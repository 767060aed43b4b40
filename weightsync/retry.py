"""Bounded retries with exponential backoff and full jitter.

One policy for every network call keeps the behaviour predictable: a transient
failure is retried up to `attempts` times, honouring a server's Retry-After, and
the last failure becomes a NetworkError (exit 7) with a one-line reason.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from weightsync.errors import NetworkError, TransientError
from weightsync.progress import event

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter backoff (AWS architecture blog), never shorter than Retry-After."""
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
        if retry_after is not None:
            return max(backoff, min(retry_after, self.max_delay * 3))
        return backoff


def call_with_retries(
    what: str,
    func: Callable[[], T],
    policy: RetryPolicy,
    on_retry: Callable[[int, TransientError], None] | None = None,
) -> T:
    """Run `func`, retrying TransientError; raise NetworkError naming `what` when out of attempts."""
    for attempt in range(policy.attempts):
        try:
            return func()
        except TransientError as exc:
            if attempt + 1 >= policy.attempts:
                raise NetworkError(
                    f"{what}: {exc} (gave up after {policy.attempts} attempts; "
                    "check the endpoint and network, then rerun to resume)"
                ) from exc
            pause = policy.delay(attempt, exc.retry_after)
            event("retry", "retrying %s in %.1fs after: %s", what, pause, exc, level=logging.WARNING,
                  attempt=attempt + 1, of=policy.attempts, delay_seconds=round(pause, 2), reason=str(exc))
            if on_retry:
                on_retry(attempt + 1, exc)
            time.sleep(pause)
    raise AssertionError("unreachable")
