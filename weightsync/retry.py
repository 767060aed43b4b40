"""Bounded retries with exponential backoff and full jitter, and a no-progress watchdog.

One policy for every network call keeps the behaviour predictable: a transient
failure is retried up to `attempts` times, honouring a server's Retry-After, and
the last failure becomes a NetworkError (exit 7) with a one-line reason.

Attempts alone do not bound the time: each one may wait `--stall-timeout` for a
silent server. The watchdog does: when nothing has made progress for
`no_progress_timeout` seconds (no byte arrived on any connection and no request
succeeded), the next failure is the last, whatever attempts are left. So with the
defaults a dead endpoint ends in exit 7 after at most no_progress_timeout plus one
stall timeout, while a slow transfer whose bytes keep coming never trips it.

A server's Retry-After (the Hub's 429, S3's 503 SlowDown) is honoured up to `max_delay * 3`;
if the wait would take the sync past the watchdog it gives up at once, saying so. A source
with a --fallback behind it is not waited for beyond `retry_after_limit` (the engine sets
it): the next source is tried at once instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import NetworkError, TransientError
from weightsync.logs import counted, event

T = TypeVar("T")


class ProgressClock:
    """When anything last made progress: a byte arrived or a request succeeded (shared by all workers)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()  # one float store: atomic under the GIL, no lock on the hot path

    def quiet_for(self, since: float) -> float:
        """Seconds without progress, counted from `since` at the earliest (the start of the current call, so
        local work before it, hashing a staged file say, never counts as the network being silent)."""
        return time.monotonic() - max(self.last, since)


@dataclass(frozen=True)
class RetryPolicy:
    """The retry bounds of one sync (from its TransferConfig) and the progress clock all its requests share."""

    attempts: int = DEFAULTS.retries
    base_delay: float = DEFAULTS.retry_base
    max_delay: float = DEFAULTS.retry_max
    no_progress_timeout: float = DEFAULTS.no_progress_timeout
    retry_after_limit: float | None = None
    """A Retry-After longer than this ends the retries at once (a --fallback source is tried instead)."""
    clock: ProgressClock = field(default_factory=ProgressClock, compare=False, repr=False)

    @classmethod
    def of(cls, config: TransferConfig) -> RetryPolicy:
        return cls(attempts=config.retries, base_delay=config.retry_base, max_delay=config.retry_max,
                   no_progress_timeout=config.no_progress_timeout)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Full-jitter backoff (AWS architecture blog), never shorter than Retry-After up to `max_delay * 3`
        (60 s by default: the Hub's usual ask is honoured in full; a longer one is tried again after that, and
        the watchdog bounds how often)."""
        import random  # only once something failed

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
    """Run `func`, retrying TransientError; raise NetworkError naming `what` when out of attempts or when
    nothing made progress for `policy.no_progress_timeout` seconds."""
    started = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            result = func()
            policy.clock.tick()
            return result
        except TransientError as exc:
            reason = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"  # a source may name it already
            if attempt + 1 >= policy.attempts:
                raise NetworkError(
                    f"{reason} (gave up after {counted(policy.attempts, 'attempt')}; "
                    "check the endpoint and network, then rerun to resume)"
                ) from exc
            limit = policy.retry_after_limit
            if limit is not None and exc.retry_after is not None and exc.retry_after > limit:
                raise NetworkError(
                    f"{reason}; the server asks to retry after {exc.retry_after:g}s, longer than the {limit:g}s a "
                    "source with a --fallback behind it is waited for"
                ) from exc
            pause = policy.delay(attempt, exc.retry_after)
            quiet = policy.clock.quiet_for(started)
            if quiet + pause >= policy.no_progress_timeout:
                asked = f" and the server asks to wait {exc.retry_after:g}s more" if exc.retry_after else ""
                raise NetworkError(
                    f"{reason}; nothing arrived for {quiet:.0f}s{asked}, so it gave up after "
                    f"{counted(attempt + 1, 'attempt')} (--no-progress-timeout {policy.no_progress_timeout:g}s); "
                    "check the endpoint and network, then rerun to resume"
                ) from exc
            event("retry", "retrying %s in %.1fs after: %s", what, pause, exc, level=logging.WARNING,
                  attempt=attempt + 1, of=policy.attempts, delay_seconds=round(pause, 2), reason=str(exc))
            if on_retry:
                on_retry(attempt + 1, exc)
            time.sleep(pause)
    raise AssertionError("unreachable")
