"""One downloader per (model, revision) on a shared volume.

Two mechanisms, chosen per volume (`--lock-mode auto|flock|lease`, default auto):

* flock: a `filelock.FileLock` (flock(2)) on `.locks/<rev>.lock`. It works across
  processes and pods whose filesystem really implements flock: local disks, NFSv4
  (the Linux client maps flock to NFS byte-range locks), CephFS. The kernel drops
  the lock when its holder dies (even by SIGKILL), so a crashed pod never blocks
  the next. The holder writes its identity to `<rev>.lock.holder` so a waiter can
  say who it is waiting for.
* lease: `.locks/<rev>.lease`, created with O_EXCL (atomic on local disks, NFSv3+,
  and object-store FUSE mounts that do not implement locks at all), holding the
  holder's host, pid and a heartbeat counter that a thread bumps every
  lease-timeout/4 seconds. A waiter that sees the counter unchanged for
  `--lease-timeout` seconds (measured on its own monotonic clock, so clock skew
  between nodes does not matter) takes the lease over and logs the old holder's
  host and pid. A holder that finds its lease taken over (it was frozen longer
  than the timeout) is told by callback, as filelock reports a lost lease: the
  heartbeat thread sets `Held.lost`, the download stops, and the main path raises
  LockLostError (exit 5) through the usual reporting (termination message,
  metrics, the one error line). It also checks the lease itself, on the file,
  right before it publishes: a process frozen between two heartbeats and woken
  just before its rename still publishes nothing.

`auto` probes the volume once per process: it flocks a probe file and lets a
forked child try to flock it too. If the child gets it, flock does not exclude
on this filesystem (some FUSE / object-store mounts grant every lock) and the
lease is used instead. A FUSE mount whose locks are node-local passes the probe
on one node but does not exclude pods on other nodes: set `--lock-mode lease`
on every pod that shares such a volume (see docs/guarantees.md).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from weightsync.config import DEFAULTS, LockMode
from weightsync.errors import LockLostError, LockTimeoutError, UsageError, WeightsyncError
from weightsync.fsutil import NotRegularFileError, read_nofollow, write_atomic

log = logging.getLogger("weightsync")
WAIT_LOG_INTERVAL = 10.0
LOCK_MODES = get_args(LockMode)
DEFAULT_LEASE_TIMEOUT = DEFAULTS.lease_timeout
MIN_FILELOCK = (3, 20, 1)  # CVE-2025-68146 / CVE-2026-22701: lock files opened without following symlinks
LEASE_RECORD_BYTES = 512
_probe_cache: dict[int, bool] = {}


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def lease_path(lock_path: Path) -> Path:
    return lock_path.with_suffix(".lease")


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, as the holder recorded it (best effort)."""
    record = _read_json(_holder_path(lock_path)) or _read_json(lease_path(lock_path))
    return _describe(record)


def _describe(record: dict | None) -> str:
    try:
        assert record is not None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(record["since"])))
        return f"host {record['host']} pid {record['pid']} since {since}"
    except Exception:
        return "an unknown process"


def _read_bytes(path: Path) -> bytes | None:
    """A lock record's content, never through a symlink; None if absent or unreadable. Something planted in
    its place reads as a record nobody wrote, so a waiter sees it as held, not free."""
    try:
        return read_nofollow(path, limit=64 * 1024)
    except NotRegularFileError:
        return b"<not a regular file>"
    except OSError:
        return None


def _read_json(path: Path) -> dict | None:
    data = _read_bytes(path)
    try:
        value = json.loads(data) if data else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_filelock_version() -> None:
    """Refuse a filelock that follows symlinks when it opens lock files (< 3.20.1)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("filelock")
    except PackageNotFoundError:
        return
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_FILELOCK:
        raise WeightsyncError(f"filelock {text} is too old: it follows symlinks when opening lock files "
                              "(CVE-2025-68146, CVE-2026-22701); install filelock>=3.20.1")


def flock_held(lock_path: Path) -> bool:
    """Whether some process holds a flock on `lock_path` now, probed without taking it for longer than a
    moment (a shared lock, so two probes never exclude each other); for reports, never for exclusion."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def flock_excludes(directory: Path) -> bool:
    """Whether flock(2) on `directory`'s filesystem stops a second process (probed once per filesystem)."""
    try:
        device = os.stat(directory).st_dev
    except OSError:
        device = -1
    if device in _probe_cache:
        return _probe_cache[device]
    result = _probe_flock(directory / ".flock-probe")
    _probe_cache[device] = result
    if not result:
        log.warning("file locks do not exclude other processes on %s (FUSE or object-store mount?); using a "
                    "lease file with heartbeat instead", directory)
    return result


def _probe_flock(probe: Path) -> bool:
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise WeightsyncError(f"cannot create lock probe {probe}: {exc.strerror}; check that --dest is writable"
                              ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # another process is probing right now, and it excluded us
        except OSError:
            return False  # ENOLCK, EOPNOTSUPP...: no working locks here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the child only flocks
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 3
            try:
                child = os.open(probe, os.O_RDWR | os.O_NOFOLLOW)
                try:
                    fcntl.flock(child, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    code = 0
                except BlockingIOError:
                    code = 1
                except OSError:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 1
    finally:
        os.close(fd)


class Held:
    """A lock this process holds: how long it waited, and whether it still holds it.

    A flock is held until released (the kernel drops it only when the process dies); a lease can be lost to
    a takeover while this process was frozen: `lost` is set by the heartbeat thread, `check()` reads the
    lease file itself.
    """

    def __init__(self, waited: float, lease: _Lease | None = None, took_over: bool = False) -> None:
        self.waited = waited
        self.lease = lease
        # The lease was taken from a holder whose heartbeat stopped: frozen, perhaps, rather than dead, so
        # files it had open may still be written by it when it wakes (see Engine: they are copied first).
        self.took_over = took_over
        self.lost = lease.lost if lease is not None else threading.Event()

    def check(self) -> None:
        """Raise LockLostError unless this process still holds the lock (read now, not from the last beat)."""
        if self.lease is not None:
            self.lease.check()


def _choose_mode(mode: str, directory: Path) -> str:
    if mode not in LOCK_MODES:
        raise UsageError(f"--lock-mode {mode!r} must be one of {', '.join(LOCK_MODES)}")
    if mode == "auto":
        return "flock" if flock_excludes(directory) else "lease"
    return mode


@contextmanager
def volume_lock(lock_path: Path, timeout: float | None, what: str, mode: str = "auto",
                lease_timeout: float = DEFAULT_LEASE_TIMEOUT) -> Iterator[Held]:
    """Hold the lock for `what` (a timeout of None waits forever)."""
    if _choose_mode(mode, lock_path.parent) == "lease":
        with _lease_lock(lease_path(lock_path), timeout, what, lease_timeout) as held:
            yield held
        return
    with _flock_lock(lock_path, timeout, what) as waited:
        yield Held(waited)


@contextmanager
def _flock_lock(lock_path: Path, timeout: float | None, what: str) -> Iterator[float]:
    check_filelock_version()
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
                                  "is writable and that it is not a symlink") from exc
    waited = time.monotonic() - started
    try:
        import socket  # cold path only: a warm start takes no lock (weightsync/lazy.py)

        identity = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "mode": "flock"}
        write_atomic(_holder_path(lock_path), json.dumps(identity).encode())
        yield waited
    finally:
        _holder_path(lock_path).unlink(missing_ok=True)
        lock.release()


@contextmanager
def try_lock(lock_path: Path, mode: str = "auto",
             lease_timeout: float = DEFAULT_LEASE_TIMEOUT) -> Iterator[bool]:
    """Take the lock only if nobody holds it now; yield whether it was taken (for `weightsync gc`)."""
    if not lock_path.parent.is_dir():
        yield True
        return
    if _choose_mode(mode, lock_path.parent) == "lease":
        lease = _Lease(lease_path(lock_path), lease_timeout)
        if not lease.try_acquire():
            yield False
            return
        try:
            yield True
        finally:
            lease.release()
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def lease_is_live(path: Path, lease_timeout: float) -> bool:
    """A lease whose file was touched within the timeout (wall clock; for gc and status only)."""
    try:
        return time.time() - os.lstat(path).st_mtime < lease_timeout
    except OSError:
        return False


class _Lease:
    """A lease file: O_EXCL create, heartbeat counter rewritten in place, released by unlink."""

    def __init__(self, path: Path, lease_timeout: float) -> None:
        self.path = path
        self.timeout = lease_timeout
        import secrets
        import socket

        self.token = secrets.token_hex(8)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                       "token": self.token, "beat": 0, "mode": "lease"}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()
        self.lost_to = ""

    def _encode(self) -> bytes:
        data = json.dumps(self.record).encode()
        return data + b" " * max(0, LEASE_RECORD_BYTES - 1 - len(data)) + b"\n"

    def try_acquire(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise WeightsyncError(f"cannot create lease file {self.path}: {exc.strerror}; check that --dest is "
                                  "writable") from exc
        self._fd = fd
        os.pwrite(fd, self._encode(), 0)
        os.fsync(fd)
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _taken_by(self) -> str | None:
        """Who holds the lease file now if it is no longer this process (None while it still is)."""
        content = _read_bytes(self.path)
        current = _parse(content) if content is not None else None
        gone = content is None and not os.path.lexists(self.path)  # None alone may be a transient I/O error
        if gone:
            return "another process, which has released it since (its download may be finished)"
        if content is not None and (current or {}).get("token") != self.token:
            return _describe(current)
        return None

    def _heartbeat(self) -> None:
        """Renew the lease every timeout/4; on finding it taken over, say so once and stop renewing.

        The thread never ends the process: it sets `lost` (the fetcher stops at its next read) and the main
        path raises, so the termination message, metrics and error event are written as for any failure.
        """
        interval = min(10.0, max(0.05, self.timeout / 4))
        while not self._stop.wait(interval):
            holder = self._taken_by()
            if holder is not None:
                self.lost_to = holder
                self.lost.set()
                return
            self.record["beat"] = int(self.record["beat"]) + 1
            try:
                assert self._fd is not None
                os.pwrite(self._fd, self._encode(), 0)
            except OSError as exc:
                log.warning("cannot renew the lease %s: %s", self.path, exc.strerror)

    def check(self) -> None:
        holder = self.lost_to if self.lost.is_set() else self._taken_by()
        if holder is not None:
            self.lost_to = holder
            self.lost.set()
            raise LockLostError(f"lost the lease {self.path} to {holder} (this process was stalled for longer "
                                f"than --lease-timeout {self.timeout:g}s); this process published nothing and "
                                "the new holder publishes the model: rerun to start warm from it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = _read_json(self.path)
        if current and current.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def _lease_lock(path: Path, timeout: float | None, what: str, lease_timeout: float) -> Iterator[Held]:
    lease = _Lease(path, lease_timeout)
    started = time.monotonic()
    seen: bytes | None = None
    seen_since = started
    logged = started
    took_over = False
    while not lease.try_acquire():
        now = time.monotonic()
        content = _read_bytes(path) if not path.is_symlink() else b"<symlink>"
        if content is None:  # released meanwhile (or unreadable): try again shortly
            seen = None
            time.sleep(0.01)
            continue
        if content != seen:
            seen, seen_since = content, now
        elif now - seen_since >= lease_timeout:
            took_over = _take_over(path, content, now - seen_since) or took_over
            seen = None
            continue
        holder = _describe(_parse(content))
        if timeout is not None and now - started >= timeout:
            raise LockTimeoutError(f"{what}: still locked by {holder} after {timeout:g}s (lease file {path}); "
                                   "raise --lock-timeout, or check that process")
        if now - logged >= WAIT_LOG_INTERVAL:
            logged = now
            log.info("waiting for %s: another process is downloading it (%s)", what, holder)
        time.sleep(min(0.1, lease_timeout / 10))
    try:
        yield Held(time.monotonic() - started, lease, took_over)
    finally:
        lease.release()


def _parse(content: bytes) -> dict | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _take_over(path: Path, content: bytes, silent_for: float) -> bool:
    """Move a stale lease aside, unless it changed at the last moment (then put it back); True if moved."""
    import secrets

    aside = path.with_name(f"{path.name}.stale.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_bytes(aside) if not aside.is_symlink() else b"<symlink>"
    if moved != content:
        try:  # a new holder renewed or re-created it just now: restore it
            os.link(aside, path)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                log.debug("could not restore lease %s: %s", path, exc)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    log.warning("took over the stale lease %s of %s: no heartbeat for %.1fs (--lease-timeout)", path,
                _describe(_parse(content)), silent_for)
    return True
