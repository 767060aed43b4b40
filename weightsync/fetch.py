"""Fetch a revision's files into staging: plan what is missing, then download it, concurrently and resumably.

    plan_fetch ──> FetchPlan ──> Fetcher.run(plan) ──> {path: Verified}
       │  staged: finished by an earlier run, re-verified now
       │  downloads: resumed (their chunks on disk) or fresh
       └  bytes to download, resumed, and the space still needed

Each file is downloaded into `.staging/<rev>/parts/<id>.part` (download.py: its
resume state, part file and running hash). A killed process loses at most the
chunks in flight: the next run re-reads the state and fetches only what is
missing. Only when every byte is verified against what the source promised does a
file move into `.staging/<rev>/tree/`.

Where the time goes, and why the defaults in config.py are what they are, is
measured in benchmarks/README.md: on a small machine the client CPU is the
bottleneck, so the hot loop is one `readinto` of the socket straight into a reused
buffer, one `pwrite` into a preallocated file, and sha256 over each byte exactly once.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from weightsync.checksums import Verified, verify_path
from weightsync.config import TransferConfig
from weightsync.download import FileDownload
from weightsync.errors import DiskSpaceError, IntegrityError, TransientError, WeightsyncError
from weightsync.logs import event
from weightsync.progress import Progress
from weightsync.resources import worker_plan
from weightsync.retry import RetryPolicy, call_with_retries
from weightsync.sources import RemoteFile, Source

log = logging.getLogger("weightsync")


@dataclass
class FetchPlan:
    """What fetching a revision takes, known before any byte moves (the engine logs it and checks space)."""

    parts_dir: Path
    tree_dir: Path
    config: TransferConfig
    staged: dict[str, Verified] = field(default_factory=dict)
    """Files an earlier run finished in staging, re-verified against their promise by this run."""
    downloads: list[FileDownload] = field(default_factory=list)
    bytes_resumed: int = 0
    """Bytes earlier runs left on disk that the downloads continue from (0 once they failed verification)."""

    @property
    def bytes_to_download(self) -> int:
        return sum(d.remote.size for d in self.downloads) - self.bytes_resumed

    @property
    def space_needed(self) -> int:
        return sum(d.space_still_needed() for d in self.downloads)

    def restart_failed(self, verified: Iterable[str]) -> None:
        """Resumed bytes failed verification: rebuild the downloads not yet `verified` from what is on disk now
        (the bad file was discarded, so it starts from zero; the others keep their chunks) and count nothing
        as resumed."""
        done = set(verified)
        self.downloads = [self._download(d.remote) for d in self.downloads if d.remote.path not in done]
        for download in self.downloads:
            download.load_state()
        self.bytes_resumed = 0

    def _download(self, remote: RemoteFile) -> FileDownload:
        return FileDownload(remote, self.parts_dir, self.tree_dir, self.config)


def plan_fetch(files: Iterable[RemoteFile], parts_dir: Path, tree_dir: Path, config: TransferConfig,
               took_over: bool = False) -> FetchPlan:
    """For each file: finished in staging (re-verified, kept), or a download resumed from its state, or fresh.

    `took_over`: this process took over a stale lease, so the previous holder may still wake up and write into
    the part files it has open; resumed bytes are copied to files of their own first (FileDownload.detach).
    """
    plan = FetchPlan(parts_dir, tree_dir, config)
    for remote in files:
        download = plan._download(remote)
        staged = _recheck_staged(download)  # loads the resume state, complete or not
        if staged is not None:
            plan.staged[remote.path] = staged
            continue
        if took_over:
            download.detach()
        plan.downloads.append(download)
    plan.bytes_resumed = sum(d.bytes_on_disk for d in plan.downloads)
    return plan


def _recheck_staged(download: FileDownload) -> Verified | None:
    """A file an earlier run finished in staging, re-verified against its promise before it is trusted;
    None to fetch it again."""
    sha256 = download.load_state()
    if sha256 is None:
        return None
    remote, final = download.remote, download.final_path
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

    Memory is bounded by concurrency × buffer size (+ one hash window where a filesystem
    cannot be mapped), whatever the file or model size; both shrink to fit a cgroup
    memory limit (resources.worker_plan). `cancelled` is set from outside (a lost
    lease): the workers stop at their next read and nothing is published.
    """

    def __init__(self, source: Source, progress: Progress, config: TransferConfig, retry: RetryPolicy,
                 cancelled: threading.Event | None = None) -> None:
        self.source = source
        self.progress = progress
        self.config = config
        self.concurrency, self.buffer_size = worker_plan(config, source.features.streams_per_cpu)
        self.retry = retry
        self.results: dict[str, Verified] = {}
        self.retries = 0
        self.cancelled = cancelled or threading.Event()
        self._lock = threading.Lock()  # results, retries and the error: written by every worker
        self._queue: queue.Queue[tuple[FileDownload, int]] = queue.Queue()
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._workers: list[threading.Thread] = []

    def run(self, plan: FetchPlan) -> dict[str, Verified]:
        """Download and verify the plan's downloads; return what each file was verified by.

        Raises the most serious worker error (see `severity`). If resumed bytes from an earlier run fail
        verification (tampered or torn resume state), the bad file was discarded: what is still missing is
        fetched once more, the bad file from scratch.
        """
        try:
            return self._run(plan.downloads)
        except IntegrityError as exc:
            if not plan.bytes_resumed or self.cancelled.is_set():
                raise
            log.warning("data resumed from an earlier run failed verification (%s); re-downloading it", exc)
            plan.restart_failed(self.results)
            self._queue, self._abort, self._error, self._workers = queue.Queue(), threading.Event(), None, []
            return self._run(plan.downloads)

    def _run(self, downloads: list[FileDownload]) -> dict[str, Verified]:
        try:
            for download in downloads:
                download.open()
                for index in download.pending_chunks():
                    self._queue.put((download, index))
                if not download.pending_chunks():  # empty, or every chunk already on disk
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
                        log.debug("closing %s: %s", download.part.path, exc.strerror)
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
                    if self.config.fsync:
                        download.start_writeback(index)
                    download.advance_hash(blocking=False)
            except BaseException as exc:
                self._fail(_local_write_error(exc) if isinstance(exc, OSError) else exc)
                return

    def _complete(self, download: FileDownload) -> None:
        verified = download.finish(self.config.fsync)
        with self._lock:
            self.results[download.remote.path] = verified
        self.progress.file_done(download.remote.path)
        report_verified(download.remote.path, download.remote.size, verified)

    def _fetch_chunk(self, download: FileDownload, index: int, buffer: memoryview) -> None:
        end = download.chunks[index][1]
        position = download.resume_offset(index)
        catch_up_every = self.config.catch_up_every
        clock = self.retry.clock

        def attempt() -> None:
            nonlocal position
            reader = self.source.open_range(download.remote, position, end)
            unhashed = 0
            try:
                for field_name, reason in reader.voids.items():
                    download.void(field_name, reason)
                while position < end:
                    if self._stopping():
                        raise _Aborted()
                    count = reader.readinto(buffer[: min(len(buffer), end - position)])
                    if not count:
                        raise TransientError(f"connection closed early at byte {position} of {end}")
                    if self._stopping():  # the wait may have been long: write nothing once told to stop
                        raise _Aborted()
                    clock.tick()
                    download.write(buffer[:count], position)
                    position += count
                    download.chunk_progress(index, position)
                    self.progress.add_bytes(count, download.remote.path, download.remote.size)
                    unhashed += count
                    if catch_up_every and unhashed >= catch_up_every:
                        unhashed = 0
                        download.advance_hash(blocking=False)
            finally:
                reader.close()

        def count_retry(*_: object) -> None:
            with self._lock:
                self.retries += 1

        call_with_retries(f"downloading {download.remote.path}", attempt, self.retry, count_retry)


def report_verified(path: str, size: int, verified: Verified, how: str = "verified") -> None:
    """The `file_verified` event: which evidence the file's bytes matched, and its sha256 (computed here)."""
    event("file_verified", "%s %s (%d bytes) by %s; sha256 %s", how, path, size, verified.evidence.label,
          verified.sha256, path=path, size=size, sha256=verified.sha256, evidence=verified.evidence.label,
          evidence_kind=verified.evidence.kind, computed=list(verified.computed), how=how)


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
