"""One file's download: its resume state, its part file and the hash that follows the writers.

Many workers write chunks of one file at once; the hash follows the contiguous
prefix of written bytes (finished chunks, then the written part of the next one), a
few MiB behind them, reading it back through a read-only mmap of the page cache (no
copy). So there is no second pass over the file at the end, and no hash state has to
survive a crash: a resumed file is re-hashed from disk up to where it stopped. Only
when every byte matched what the source promised does the file move into the
staging tree.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from weightsync.checksums import Verified, Verifier
from weightsync.config import TransferConfig
from weightsync.errors import IntegrityError
from weightsync.fsutil import is_regular_file_of_size, write_atomic
from weightsync.partfile import PartFile
from weightsync.resume import ResumeState
from weightsync.sources import RemoteFile

log = logging.getLogger("weightsync")


def part_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:24]


class PrefixHasher:
    """Feeds a file's written prefix to its Verifier, from the page cache, one thread at a time.

    `lock` guards `verifier` and `hashed`: whoever holds it is the only reader and may swap the verifier
    (`restart`). A worker that finds it taken skips hashing (`advance(blocking=False)`): the holder is
    already catching up, and a worker waiting here would leave its connection idle.
    """

    def __init__(self, verifier: Verifier, window: int) -> None:
        self.verifier = verifier
        self.hashed = 0
        self.lock = threading.Lock()
        self._window = window
        self._scratch: memoryview | None = None

    def advance(self, fd: int, frontier: Callable[[], int], blocking: bool) -> None:
        if not self.lock.acquire(blocking=blocking):
            return
        try:
            while (end := frontier()) > self.hashed:
                length = min(self._window, end - self.hashed)
                self._hash_from_disk(fd, self.hashed, length)
                self.hashed += length
        finally:
            self.lock.release()

    def restart(self, verifier: Verifier) -> None:
        """With `lock` held: verify against another promise, from byte 0 (re-read from the page cache)."""
        self.verifier, self.hashed = verifier, 0

    def _hash_from_disk(self, fd: int, offset: int, length: int) -> None:
        """Hash `length` bytes at `offset` through a read-only mapping (no copy), else a read into a buffer."""
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with mmap.mmap(fd, offset + length - base, prot=mmap.PROT_READ, offset=base) as mapped, \
                    memoryview(mapped) as view, view[offset - base:] as data:
                self.verifier.update(data)
            return
        except (OSError, ValueError):  # a filesystem without mmap: read it instead
            pass
        if self._scratch is None or len(self._scratch) < length:
            self._scratch = memoryview(bytearray(max(length, self._window)))
        done = 0
        while done < length:
            count = os.preadv(fd, [self._scratch[done:length]], offset + done)
            if not count:
                raise IntegrityError(f"{self.verifier.path}: the part file is shorter than expected; rerun to resume",
                                     path=self.verifier.path)
            done += count
        self.verifier.update(self._scratch[:length])


class FileDownload:
    """One file's chunks: resume state (`state`), bytes on disk (`part`) and running hash (`hasher`).

    Locks, and what each guards (taken in this order, never the reverse):
    - `hasher.lock`: the verifier and how far it got (see PrefixHasher); `void` takes it to swap promises.
    - `_state_lock`: `state.done` / `state.partial`, the hash's next chunk and the save pacing; held for
      in-memory updates only, never across a network read or a hash.
    - `_save_lock`: at most one worker writes the progress state file at a time; the others skip the save
      rather than wait for it.
    """

    def __init__(self, remote: RemoteFile, parts_dir: Path, tree_dir: Path, config: TransferConfig) -> None:
        self.remote = remote
        self.config = config
        self.state = ResumeState.fresh(remote, config.chunk_size_for(remote.size))
        ident = part_id(remote.path)
        self.part = PartFile(parts_dir / f"{ident}.part", remote.size)
        self.state_path = parts_dir / f"{ident}.json"
        self.tree_dir = tree_dir
        self.hasher = PrefixHasher(Verifier(remote.path, remote.size, remote.evidence), config.hash_window)
        self._state_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._saved_at = 0.0
        self._unsaved = 0
        self._next_chunk_to_hash = 0

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return self.state.chunks

    @property
    def final_path(self) -> Path:
        return self.tree_dir / self.remote.path

    # -- resume ---------------------------------------------------------------
    def load_state(self) -> str | None:
        """Resume from disk. Return the sha256 if the file is already complete and verified."""
        state = ResumeState.load(self.state_path, self.remote, self.state.chunk_size)
        if state is None or not (self.part.complete_size or (state.sha256 and self._in_tree())):
            self.state.forget_progress()
            return None
        if state.sha256 is not None:
            if not self._in_tree():
                self.part.move_into(self.tree_dir, self.remote.path)
            return state.sha256
        self.state = state
        return None

    def _in_tree(self) -> bool:
        return is_regular_file_of_size(self.final_path, self.remote.size)

    def detach(self) -> None:
        """After a lease takeover: the resumed bytes get an inode of their own (PartFile.detach)."""
        if not self.state.started or not self.part.complete_size:
            return
        try:
            self.part.detach(self.state.recorded_ranges())
        except EOFError as exc:
            raise IntegrityError(f"{self.part.path} is shorter than its resume state says ({exc}); rerun") from exc

    @property
    def bytes_on_disk(self) -> int:
        return self.state.bytes_on_disk

    def space_still_needed(self) -> int:
        """Bytes the volume must still provide for this file: what staging already holds (written, or
        preallocated by an earlier run) does not count twice."""
        return max(0, self.remote.size - max(self.part.blocks_on_disk(), self.bytes_on_disk))

    def pending_chunks(self) -> list[int]:
        return self.state.pending()

    def resume_offset(self, index: int) -> int:
        return self.state.resume_offset(index)

    # -- writing ----------------------------------------------------------------
    def open(self) -> None:
        """Open (creating and pre-sizing if needed) the part file; never through a symlink."""
        self.part.open(keep=self.state.started)
        self._save_state()

    def close(self) -> None:
        self.part.close()

    def write(self, data: memoryview, offset: int) -> None:
        self.part.write(data, offset)

    def chunk_progress(self, index: int, position: int) -> None:
        """Note bytes written inside a chunk; saved at most every `state_save_interval`, so a kill loses little.

        The state is serialised under the lock but written outside it, by one thread at a
        time: other workers never wait for a save. A save that loses the race to a newer
        one may land after it; that only under-reports progress, which is always safe.
        """
        config = self.config
        with self._state_lock:
            before = self.state.partial.get(index, 0)
            self.state.partial[index] = position - self.chunks[index][0]
            self._unsaved += self.state.partial[index] - before
            now = time.monotonic()
            due = now - self._saved_at >= (config.state_save_interval if self._unsaved >= config.state_save_bytes
                                           else config.state_save_seconds)
            if not due or not self._save_lock.acquire(blocking=False):
                return
            self._saved_at, self._unsaved = now, 0
            body = self.state.to_json()
        try:
            write_atomic(self.state_path, body, durable=False)
        finally:
            self._save_lock.release()

    def chunk_finished(self, index: int) -> bool:
        """Record a finished chunk; return True when it was the file's last one."""
        with self._state_lock:
            self.state.done.add(index)
            self.state.partial.pop(index, None)
            self._save_state()
            return len(self.state.done) == len(self.chunks)

    def _save_state(self) -> None:
        write_atomic(self.state_path, self.state.to_json(), durable=False)

    def start_writeback(self, index: int) -> None:
        """Start writing a finished chunk to the device now, so the fsync before publish has little left."""
        start, end = self.chunks[index]
        self.part.start_writeback(start, end - start)

    # -- verifying -------------------------------------------------------------------
    def advance_hash(self, blocking: bool) -> None:
        """Hash the contiguous written prefix not yet hashed (one thread at a time)."""
        assert self.part.fd is not None
        self.hasher.advance(self.part.fd, self._frontier, blocking)

    def _frontier(self) -> int:
        with self._state_lock:
            end, self._next_chunk_to_hash = self.state.contiguous_end(self._next_chunk_to_hash)
            return end

    def void(self, field: str, reason: str) -> None:
        """A response proved one promise unsound (an SSE-KMS ETag is no MD5): verify against the next best.

        If that changes what is computed, hashing restarts from byte 0 (the first response of a file tells,
        so little has been hashed by then).
        """
        with self.hasher.lock:
            promises = tuple(p.void(reason) if p.field == field and not p.unusable else p
                             for p in self.remote.promises)
            if promises == self.remote.promises:
                return
            self.remote = self.remote.with_promises(promises)
            evidence = self.remote.evidence
            if evidence != self.hasher.verifier.evidence:
                instead = (f"verifying it by {evidence.label} instead" if evidence.promise
                           else "only its size is checked")
                log.warning("%s: %s; %s", self.remote.path, reason, instead)
                self.hasher.restart(Verifier(self.remote.path, self.remote.size, evidence))

    def finish(self, fsync: bool) -> Verified:
        """Verify the whole file against the chosen promise and move it into the tree."""
        self.advance_hash(blocking=True)
        size = self.part.length_now()
        if self.hasher.hashed != self.remote.size or size != self.remote.size:
            self._discard()
            raise IntegrityError(f"size mismatch for {self.remote.path}: expected {self.remote.size} bytes, "
                                 f"got {size}; the file was discarded — rerun", path=self.remote.path,
                                 expected=self.remote.size, got=size)
        try:
            sha256 = self.hasher.verifier.finish()
        except IntegrityError:
            self._discard()
            raise
        if fsync:
            self.part.sync()
        self.part.close()
        with self._state_lock:
            self.state.sha256 = sha256
            self._save_state()  # not fsynced: the data is (when asked); a lost state only means downloading again
        self.part.move_into(self.tree_dir, self.remote.path)
        return Verified(sha256, self.hasher.verifier.evidence, self.hasher.verifier.computed)

    def _discard(self) -> None:
        self.part.discard()
        self.state_path.unlink(missing_ok=True)
