"""Fetch files into staging in ranged chunks, concurrently, resumably, hashing as they land.

Each file is downloaded into `.staging/<rev>/parts/<id>.part` (pre-sized, written
with pwrite at chunk offsets) and its resume state `<id>.json` records which
chunks are on disk. A killed process loses at most the chunks in flight: the next
run re-reads the state and fetches only what is missing.

Hashing follows the contiguous prefix of written bytes (finished chunks, then the
written part of the next one), a few MiB behind the writers, through a read-only
mmap of the page cache (no copy), so there is no second pass over the file at the
end and no hash state has to survive a crash (a resumed file is re-hashed from
disk up to where it stopped). Only when every byte is verified against what the
source promised does the file move into `.staging/<rev>/tree/`.

Where the time goes, and why the knobs below are what they are, is measured in
benchmarks/README.md: on a small machine the client CPU is the bottleneck, so the
hot loop is one `readinto` of the socket straight into a reused buffer, one
`pwrite` into a preallocated file, and sha256 over each byte exactly once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from weightsync.checksums import Verified, Verifier, verify_path
from weightsync.errors import DiskSpaceError, IntegrityError, WeightsyncError
from weightsync.fsutil import copy_range, is_regular_file_of_size, read_nofollow, write_atomic
from weightsync.layout import safe_makedirs
from weightsync.logs import event
from weightsync.progress import Progress
from weightsync.retry import RetryPolicy, call_with_retries
from weightsync.sources import RemoteFile, Source

log = logging.getLogger("weightsync")

MIN_CHUNK = 64 * 1024 * 1024
MAX_CHUNKS_PER_FILE = 1024
# Small enough to stay in a core's L2 between the socket read, the pwrite and the sha256
# (1 MiB buffers cost ~50% more CPU per byte on this project's 1 MiB-L2 machines).
BUFFER_SIZE = 256 * 1024
MIN_BUFFER_SIZE = 64 * 1024
HASH_WINDOW = 2 * 1024 * 1024
CATCH_UP_EVERY = 8 * 1024 * 1024
STATE_VERSION = 1
STATE_SAVE_BYTES = 1024 * 1024
STATE_SAVE_INTERVAL = 0.1
STATE_SAVE_SECONDS = 1.0


def chunk_size_for(size: int) -> int:
    """64 MiB chunks (one ranged GET each), larger for huge files so the resume state stays small."""
    per_chunk = -(-size // MAX_CHUNKS_PER_FILE)
    return max(MIN_CHUNK, -(-per_chunk // (1024 * 1024)) * 1024 * 1024)


def _libc() -> Any:
    """The C library through ctypes (imported only on the cold path), or None where there is none."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL(None, use_errno=True)
        except (OSError, ImportError):
            _LIBC = False
    return _LIBC or None


_LIBC: Any = None


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks with fallocate(2): a full volume fails now, not half way through, and
    concurrent pwrites into allocated extents cost a fraction of writes into a sparse file's holes
    (ext4: about a quarter of the system time). A filesystem without fallocate keeps the sparse file."""
    libc = _libc()
    fallocate = getattr(libc, "fallocate", None) if libc is not None else None
    if size <= 0 or fallocate is None:
        return
    import ctypes

    if fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to the device (sync_file_range(2), asynchronous): the
    final fsync then waits for what is left instead of the whole file. Best effort; a no-op elsewhere."""
    libc = _libc()
    sync_file_range = getattr(libc, "sync_file_range", None) if libc is not None else None
    if sync_file_range is None or length <= 0:
        return
    import ctypes

    sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), ctypes.c_uint(SYNC_FILE_RANGE_WRITE))


def part_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:24]


class FileDownload:
    """One file's chunks, resume state and running hash."""

    def __init__(self, remote: RemoteFile, parts_dir: Path, tree_dir: Path) -> None:
        self.remote = remote
        self.chunk_size = chunk_size_for(remote.size)
        self.chunks = [(start, min(start + self.chunk_size, remote.size))
                       for start in range(0, remote.size, self.chunk_size)]
        ident = part_id(remote.path)
        self.part_path = parts_dir / f"{ident}.part"
        self.state_path = parts_dir / f"{ident}.json"
        self.tree_dir = tree_dir
        self.done: set[int] = set()
        self.partial: dict[int, int] = {}
        self._saved_at = 0.0
        self._unsaved = 0
        self._fd: int | None = None
        self._state_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        self.verifier = Verifier(remote.path, remote.size, remote.evidence)
        self._hashed = 0
        self._next_chunk_to_hash = 0
        self._scratch: memoryview | None = None

    # -- resume state -------------------------------------------------------
    def _state(self, complete_sha256: str | None = None) -> dict[str, object]:
        return {"version": STATE_VERSION, "path": self.remote.path, "size": self.remote.size,
                "etag": self.remote.etag, "chunk_size": self.chunk_size, "done": sorted(self.done),
                "partial": {str(i): n for i, n in self.partial.items() if i not in self.done},
                "sha256": complete_sha256}

    def load_state(self) -> str | None:
        """Resume from disk. Return the sha256 if the file is already complete and verified."""
        try:
            state = json.loads(read_nofollow(self.state_path, limit=1 << 20))
            same = (state.get("version") == STATE_VERSION and state.get("path") == self.remote.path
                    and state.get("size") == self.remote.size and state.get("etag") == self.remote.etag
                    and state.get("chunk_size") == self.chunk_size)
        except (OSError, ValueError, AttributeError):
            same = False
            state = {}
        if not same:
            self.done = set()
            return None
        final = self.tree_dir / self.remote.path
        sha256 = state.get("sha256")
        if isinstance(sha256, str) and len(sha256) == 64:
            if is_regular_file_of_size(final, self.remote.size):
                return sha256
            if is_regular_file_of_size(self.part_path, self.remote.size):
                self._move_into_tree()
                return sha256
            return None
        done, partial = state.get("done"), state.get("partial") or {}
        if isinstance(done, list) and is_regular_file_of_size(self.part_path, self.remote.size):
            self.done = {i for i in done if isinstance(i, int) and 0 <= i < len(self.chunks)}
            for index, count in (partial.items() if isinstance(partial, dict) else ()):
                if str(index).isdigit() and isinstance(count, int) and int(index) < len(self.chunks):
                    start, end = self.chunks[int(index)]
                    if 0 < count < end - start:
                        self.partial[int(index)] = count
        return None

    def detach(self) -> None:
        """Give the resumed bytes a file (inode) of their own before resuming them.

        After a lease takeover the previous holder may be frozen, not dead: when it wakes, its in-flight
        pwrites still land in the part file it has open, which this run would otherwise finish and publish.
        Copying the bytes the resume state records into a new file and renaming it over the old name leaves
        the old holder writing into an unlinked inode nobody reads. Only recorded ranges are copied.
        """
        if not (self.done or self.partial) or not is_regular_file_of_size(self.part_path, self.remote.size):
            return
        fresh = self.part_path.with_name(self.part_path.name + ".detached")
        source = os.open(self.part_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            target = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(target, self.remote.size)
                ranges = [self.chunks[i] for i in self.done]
                ranges += [(self.chunks[i][0], self.chunks[i][0] + n) for i, n in self.partial.items()
                           if i not in self.done]
                for start, end in ranges:
                    try:
                        copy_range(source, target, start, end - start)
                    except EOFError as exc:
                        raise IntegrityError(f"{self.part_path} is shorter than its resume state says ({exc}); "
                                             "rerun") from exc
            finally:
                os.close(target)
        finally:
            os.close(source)
        os.replace(fresh, self.part_path)

    @property
    def bytes_on_disk(self) -> int:
        whole = sum(self.chunks[i][1] - self.chunks[i][0] for i in self.done)
        return whole + sum(n for i, n in self.partial.items() if i not in self.done)

    def resume_offset(self, index: int) -> int:
        """Where chunk `index` continues: its start plus the bytes a previous run already wrote."""
        return self.chunks[index][0] + self.partial.get(index, 0)

    def chunk_progress(self, index: int, position: int) -> None:
        """Note bytes written inside a chunk; saved at most every STATE_SAVE_INTERVAL, so a kill loses little.

        The state is serialised under the lock but written outside it, by one thread at a
        time: other workers never wait for a save. A save that loses the race to a newer
        one may land after it; that only under-reports progress, which is always safe.
        """
        with self._state_lock:
            before = self.partial.get(index, 0)
            self.partial[index] = position - self.chunks[index][0]
            self._unsaved += self.partial[index] - before
            now = time.monotonic()
            due = now - self._saved_at >= (STATE_SAVE_INTERVAL if self._unsaved >= STATE_SAVE_BYTES
                                           else STATE_SAVE_SECONDS)
            if not due or not self._save_lock.acquire(blocking=False):
                return
            self._saved_at, self._unsaved = now, 0
            state = json.dumps(self._state()).encode()
        try:
            write_atomic(self.state_path, state, durable=False)
        finally:
            self._save_lock.release()

    def pending_chunks(self) -> list[int]:
        return [i for i in range(len(self.chunks)) if i not in self.done]

    def open(self) -> None:
        """Open (creating and pre-sizing if needed) the part file; never through a symlink."""
        if not self.done and not self.partial:
            self.part_path.unlink(missing_ok=True)
        fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size != self.remote.size:
                os.ftruncate(fd, self.remote.size)
            preallocate(fd, self.remote.size)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        write_atomic(self.state_path, json.dumps(self._state()).encode(), durable=False)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None
        while data:
            written = os.pwrite(self._fd, data, offset)
            data = data[written:]
            offset += written

    def chunk_finished(self, index: int) -> bool:
        """Record a finished chunk; return True when it was the file's last one."""
        with self._state_lock:
            self.done.add(index)
            self.partial.pop(index, None)
            write_atomic(self.state_path, json.dumps(self._state()).encode(), durable=False)
            return len(self.done) == len(self.chunks)

    def start_writeback(self, index: int) -> None:
        """Start writing a finished chunk to the device now, so the fsync before publish has little left."""
        if self._fd is not None:
            start, end = self.chunks[index]
            start_writeback(self._fd, start, end - start)

    # -- hashing ------------------------------------------------------------
    def advance_hash(self, blocking: bool) -> None:
        """Hash the contiguous written prefix not yet hashed (one thread at a time)."""
        if not self._hash_lock.acquire(blocking=blocking):
            return
        try:
            self._catch_up()
        finally:
            self._hash_lock.release()

    def _frontier(self) -> int:
        """End of the contiguous prefix of bytes on disk: finished chunks, then the next one's written part."""
        with self._state_lock:
            while self._next_chunk_to_hash in self.done:
                self._next_chunk_to_hash += 1
            if self._next_chunk_to_hash == len(self.chunks):
                return self.remote.size
            return self.chunks[self._next_chunk_to_hash][0] + self.partial.get(self._next_chunk_to_hash, 0)

    def _catch_up(self) -> None:
        """With the hash lock held: hash [hashed, frontier) from the page cache."""
        assert self._fd is not None
        while (frontier := self._frontier()) > self._hashed:
            length = min(HASH_WINDOW, frontier - self._hashed)
            self._hash_from_disk(self._hashed, length)
            self._hashed += length

    def _hash_from_disk(self, offset: int, length: int) -> None:
        """Hash `length` bytes at `offset` through a read-only mapping (no copy), else a read into a buffer."""
        assert self._fd is not None
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with mmap.mmap(self._fd, offset + length - base, prot=mmap.PROT_READ, offset=base) as mapped, \
                    memoryview(mapped) as view, view[offset - base:] as data:
                self.verifier.update(data)
            return
        except (OSError, ValueError):  # a filesystem without mmap: read it instead
            pass
        if self._scratch is None or len(self._scratch) < length:
            self._scratch = memoryview(bytearray(HASH_WINDOW))
        done = 0
        while done < length:
            count = os.preadv(self._fd, [self._scratch[done:length]], offset + done)
            if not count:
                raise IntegrityError(f"{self.part_path} is shorter than expected; rerun to resume")
            done += count
        self.verifier.update(self._scratch[:length])

    def void(self, field: str, reason: str) -> None:
        """A response proved one promise unsound (an SSE-KMS ETag is no MD5): verify against the next best.

        If that changes what is computed, hashing restarts from byte 0 (re-read from the page cache; the
        first response of a file tells, so little has been hashed by then).
        """
        with self._hash_lock:
            promises = tuple(p.void(reason) if p.field == field and not p.unusable else p
                             for p in self.remote.promises)
            if promises == self.remote.promises:
                return
            self.remote = self.remote.with_promises(promises)
            evidence = self.remote.evidence
            if evidence != self.verifier.evidence:
                instead = (f"verifying it by {evidence.label} instead" if evidence.promise
                           else "only its size is checked")
                log.warning("%s: %s; %s", self.remote.path, reason, instead)
                self.verifier = Verifier(self.remote.path, self.remote.size, evidence)
                self._hashed = 0

    def finish(self, fsync: bool) -> Verified:
        """Verify the whole file against the chosen promise and move it into the tree."""
        self.advance_hash(blocking=True)
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if self._hashed != self.remote.size or size != self.remote.size:
            self._discard()
            raise IntegrityError(f"size mismatch for {self.remote.path}: expected {self.remote.size} bytes, "
                                 f"got {size}; the file was discarded — rerun")
        try:
            sha256 = self.verifier.finish()
        except IntegrityError:
            self._discard()
            raise
        if fsync:
            os.fsync(self._fd)
        self.close()
        with self._state_lock:
            # Not fsynced: the data is (when asked), and a lost state file only means re-downloading.
            write_atomic(self.state_path, json.dumps(self._state(sha256)).encode(), durable=False)
        self._move_into_tree()
        return Verified(sha256, self.verifier.evidence, self.verifier.computed)

    def _move_into_tree(self) -> None:
        parent = self.remote.path.rpartition("/")[0]
        target_dir = safe_makedirs(self.tree_dir, parent) if parent else self.tree_dir
        os.replace(self.part_path, target_dir / self.remote.path.rpartition("/")[2])

    def _discard(self) -> None:
        self.close()
        self.part_path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)


def recheck_staged(download: FileDownload) -> Verified | None:
    """A file an earlier run finished in staging, re-verified against its promise before it is trusted;
    None to fetch it again."""
    sha256 = download.load_state()
    if sha256 is None:
        return None
    remote = download.remote
    final = download.tree_dir / remote.path
    try:
        verified = verify_path(final, remote.path, remote.size, remote.evidence)
        if verified.sha256 != sha256:
            raise IntegrityError(f"{remote.path}: sha256 {verified.sha256} differs from the resume state")
    except (OSError, IntegrityError) as exc:
        log.warning("staged %s failed re-verification (%s); downloading it again", remote.path, exc)
        final.unlink(missing_ok=True)
        download.state_path.unlink(missing_ok=True)
        return None
    return verified






class Fetcher:
    """A bounded pool of worker threads pulling chunks from one queue across all files.

    Memory is bounded by concurrency × buffer size (+ one HASH_WINDOW where a filesystem
    cannot be mapped), whatever the file or model size; both shrink to fit a cgroup
    memory limit (see `worker_plan`).
    """

    def __init__(self, source: Source, progress: Progress, concurrency: int, retry: RetryPolicy,
                 fsync: bool = True, cancelled: threading.Event | None = None) -> None:
        self.source = source
        self.progress = progress
        self.concurrency, self.buffer_size = worker_plan(concurrency,
                                                         streams_per_cpu=source.features.streams_per_cpu)
        self.retry = retry
        self.fsync = fsync
        self.results: dict[str, Verified] = {}
        self.retries = 0
        self.cancelled = cancelled or threading.Event()  # set from outside (a lost lease): stop, publish nothing
        self._queue: queue.Queue[tuple[FileDownload, int]] = queue.Queue()
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # results, retries and the error: written by every worker
        self._workers: list[threading.Thread] = []

    def run(self, downloads: list[FileDownload]) -> dict[str, Verified]:
        """Download and verify everything; return what each file was verified by. Raises the first fatal error."""
        try:
            for download in downloads:
                download.open()
                if not download.chunks:
                    self._complete(download)
                for index in download.pending_chunks():
                    self._queue.put((download, index))
                if download.chunks and not download.pending_chunks():
                    self._complete(download)
            workers = [threading.Thread(target=self._work, name=f"fetch-{n}", daemon=True)
                       for n in range(min(self.concurrency, max(1, self._queue.qsize())))]
            self._workers = workers
            for worker in workers:
                worker.start()
            for worker in workers:
                while worker.is_alive():
                    worker.join(0.2)
        except OSError as exc:
            raise _local_write_error(exc) from exc
        finally:
            self._abort.set()
            # Interrupted (SIGTERM, Ctrl-C): workers stop at their next read. One still blocked in a read keeps
            # its file open, so no descriptor it may still write to is closed and reused under it; the process
            # is exiting anyway.
            deadline = time.monotonic() + 2.0
            for worker in self._workers:
                worker.join(max(0.0, deadline - time.monotonic()))
            if not any(worker.is_alive() for worker in self._workers):
                for download in downloads:
                    try:
                        download.close()
                    except OSError as exc:  # an abandoned file (NFS, FUSE: EBADF, EIO at close) says nothing
                        log.debug("closing %s: %s", download.part_path, exc.strerror)
        if self._error is not None and not isinstance(self._error, _Aborted):
            raise self._error
        if self.cancelled.is_set() or self._error is not None:
            raise _Aborted("the download was stopped before it finished")
        return self.results

    def _stopping(self) -> bool:
        return self._abort.is_set() or self.cancelled.is_set()

    def _fail(self, exc: BaseException) -> None:
        """Keep the most serious error of all workers (see `severity`), and stop the others."""
        with self._lock:
            if self._error is None or severity(exc) > severity(self._error):
                self._error = exc
        self._abort.set()

    def _work(self) -> None:
        buffer = memoryview(bytearray(self.buffer_size))
        while not self._stopping():
            try:
                download, index = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                self._fetch_chunk(download, index, buffer)
                if download.chunk_finished(index):
                    self._complete(download)
                else:
                    if self.fsync:
                        download.start_writeback(index)
                    download.advance_hash(blocking=False)
            except BaseException as exc:
                self._fail(_local_write_error(exc) if isinstance(exc, OSError) else exc)
                return

    def _complete(self, download: FileDownload) -> None:
        verified = download.finish(self.fsync)
        with self._lock:
            self.results[download.remote.path] = verified
        self.progress.file_done(download.remote.path)
        report_verified(download.remote.path, download.remote.size, verified)

    def _fetch_chunk(self, download: FileDownload, index: int, buffer: memoryview) -> None:
        end = download.chunks[index][1]
        position = download.resume_offset(index)

        def attempt() -> None:
            nonlocal position
            reader = self.source.open_range(download.remote, position, end)
            unhashed = 0
            try:
                for field, reason in reader.voids.items():
                    download.void(field, reason)
                while position < end:
                    if self._stopping():
                        raise _Aborted()
                    count = reader.readinto(buffer[: min(len(buffer), end - position)])
                    if not count:
                        from weightsync.errors import TransientError

                        raise TransientError(f"connection closed early at byte {position} of {end}")
                    if self._stopping():  # the wait may have been long: write nothing once told to stop
                        raise _Aborted()
                    clock.tick()
                    download.write(buffer[:count], position)
                    position += count
                    download.chunk_progress(index, position)
                    self.progress.add_bytes(count, download.remote.path, download.remote.size)
                    unhashed += count
                    if CATCH_UP_EVERY and unhashed >= CATCH_UP_EVERY:
                        unhashed = 0
                        download.advance_hash(blocking=False)
            finally:
                reader.close()

        clock = self.retry.clock

        def count_retry(*_: object) -> None:
            with self._lock:
                self.retries += 1

        call_with_retries(f"downloading {download.remote.path}", attempt, self.retry, count_retry)


def report_verified(path: str, size: int, verified: Verified, how: str = "verified") -> None:
    """The `file_verified` event: which evidence the file's bytes matched, and its sha256 (computed here)."""
    event("file_verified", "%s %s (%d bytes) by %s; sha256 %s", how, path, size, verified.evidence.label,
          verified.sha256, path=path, size=size, sha256=verified.sha256, evidence=verified.evidence.label,
          evidence_kind=verified.evidence.kind, computed=list(verified.computed), how=how)


def cgroup_limits(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
                  ) -> tuple[float | None, int | None]:
    """(CPUs, memory bytes) this process's cgroups allow, v2 or v1, the tightest along the path up to
    the root; None for unlimited or unknown."""
    paths: dict[str, str] = {}
    try:
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path.strip("/")
    except (OSError, ValueError):
        pass

    def tightest(base: Path, controller: str, read: Any) -> Any:
        found = None
        relative = Path(paths.get(controller, ""))
        for directory in dict.fromkeys([base / relative, *(base / parent for parent in relative.parents)]):
            try:
                value = read(directory)
            except (OSError, ValueError, ZeroDivisionError, IndexError):
                continue
            if value is not None and (found is None or value < found):
                found = value
        return found

    def cpu_v2(directory: Path) -> float | None:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)

    def memory_v2(directory: Path) -> int | None:
        value = (directory / "memory.max").read_text().strip()
        return None if value == "max" else int(value)

    def cpu_v1(directory: Path) -> float | None:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return quota / int((directory / "cpu.cfs_period_us").read_text()) if quota > 0 else None

    def memory_v1(directory: Path) -> int | None:
        value = int((directory / "memory.limit_in_bytes").read_text())
        return value if value < 1 << 60 else None

    cpus = tightest(root, "", cpu_v2)
    memory = tightest(root, "", memory_v2)
    if cpus is None:
        cpus = tightest(root / "cpu", "cpu", cpu_v1)
    if memory is None:
        memory = tightest(root / "memory", "memory", memory_v1)
    return cpus, memory


def usable_cpus(limits: tuple[float | None, int | None] | None = None) -> float:
    """CPUs this process may use: its affinity mask, within the cgroup's CPU quota."""
    cpus = (limits if limits is not None else cgroup_limits())[0]
    try:
        available = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        available = float(os.cpu_count() or 1)
    return min(available, cpus) if cpus else available


def worker_plan(requested: int, limits: tuple[float | None, int | None] | None = None,
                streams_per_cpu: int | None = None) -> tuple[int, int]:
    """(workers, buffer bytes) for `requested` concurrent ranges within the cgroup's limits.

    Buffers may take 1/16 of a memory limit (the interpreter, boto3 and the kernel's
    dirty page cache need the rest): buffers shrink first, down to MIN_BUFFER_SIZE, then
    the number of workers. A source whose reader parses HTTP in Python under the GIL
    (the Hub's httpx) sets `streams_per_cpu`: past that many streams per usable CPU,
    each stream only adds GIL contention (on 2 CPUs, 8 streams took 20-25% longer than 4).
    """
    limits = limits if limits is not None else cgroup_limits()
    memory = limits[1]
    workers, buffer = max(1, requested), BUFFER_SIZE
    if streams_per_cpu:
        workers = min(workers, max(2, int(streams_per_cpu * usable_cpus(limits))))
    if memory is not None:
        budget = max(MIN_BUFFER_SIZE, memory // 16)
        workers = min(workers, max(1, budget // MIN_BUFFER_SIZE))
        buffer = max(MIN_BUFFER_SIZE, min(BUFFER_SIZE, budget // workers // (64 * 1024) * 64 * 1024))
    return workers, buffer


class _Aborted(WeightsyncError):
    """Another worker failed, or the sync was cancelled; this one stops quietly."""


def severity(exc: BaseException) -> int:
    """Which worker error the user hears about when several fail at once: bad bytes first (they may mean
    tampering), then a full disk, a lost lock and the network; a worker that only stopped because another
    failed comes last. So a network error can never hide an integrity failure."""
    from weightsync.errors import LockLostError, LockTimeoutError, NetworkError

    if isinstance(exc, _Aborted):
        return 0
    ranking = ((IntegrityError, 5), (DiskSpaceError, 4), ((LockLostError, LockTimeoutError), 3), (NetworkError, 2))
    return next((rank for kinds, rank in ranking if isinstance(exc, kinds)), 1)


def _local_write_error(exc: OSError) -> WeightsyncError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(f"the volume filled up while writing {exc.filename or 'a download'}: "
                              f"{exc.strerror}; free space or grow the volume, then rerun (finished chunks "
                              "are kept and the download resumes)")
    return WeightsyncError(f"cannot write {exc.filename or 'to the volume'}: {exc.strerror}; check --dest")
