"""One downloader per (model, revision) on a shared volume.

The lock is a `filelock.FileLock` (flock(2)) on a file inside DEST, so it works
across processes and across pods sharing an RWX volume whose filesystem supports
flock: local disks, NFSv4 (Linux maps flock to NFS byte-range locks), CephFS.
The kernel drops the lock when its holder dies (even by SIGKILL), so a crashed
pod never blocks the next. The holder writes its identity next to the lock so a
waiter can say who it is waiting for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from weightsync.errors import LockTimeoutError, WeightsyncError

log = logging.getLogger("weightsync")
WAIT_LOG_INTERVAL = 10.0


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, as the holder recorded it (best effort)."""
    try:
        info = json.loads(_holder_path(lock_path).read_text())
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info["since"]))
        return f"host {info['host']} pid {info['pid']} since {since}"
    except Exception:
        return "an unknown process"


@contextmanager
def volume_lock(lock_path: Path, timeout: float | None, what: str) -> Iterator[float]:
    """Hold the lock for `what`; yield the seconds spent waiting. None waits forever."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path), mode=0o644, is_singleton=False)
    started = time.monotonic()
    while True:
        remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
        step = WAIT_LOG_INTERVAL if remaining is None else min(WAIT_LOG_INTERVAL, remaining)
        try:
            lock.acquire(timeout=step, poll_interval=0.05)
            break
        except Timeout:
            holder = describe_holder(lock_path)
            if remaining is not None and remaining <= step:
                raise LockTimeoutError(
                    f"{what}: still locked by {holder} after {timeout:g}s (lock file {lock_path}); raise "
                    "--lock-timeout, or check that process"
                ) from None
            log.info("waiting for %s: another process is downloading it (%s)", what, holder)
        except OSError as exc:
            raise WeightsyncError(f"cannot create lock file {lock_path}: {exc.strerror}; check that --dest "
                                  "is writable") from exc
    waited = time.monotonic() - started
    try:
        from weightsync.manifest import write_atomic

        identity = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        write_atomic(_holder_path(lock_path), json.dumps(identity).encode())
        yield waited
    finally:
        _holder_path(lock_path).unlink(missing_ok=True)
        lock.release()
