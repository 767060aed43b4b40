"""The part file a download writes into, and the system calls around it.

Pre-sized (ftruncate) and preallocated (fallocate), written with pwrite at chunk
offsets by many workers at once, its finished chunks pushed towards the device as
they complete (sync_file_range) so the fsync before publish has little left. It is
opened and created without following symlinks. The libc calls are found once, on
the cold path, through ctypes; where they are missing the file still works, only
without the speed-up.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path
from typing import Any

from weightsync.fsutil import copy_range, is_regular_file_of_size
from weightsync.layout import safe_makedirs

SYNC_FILE_RANGE_WRITE = 2
_LIBC: Any = None


def _libc() -> Any:
    """The C library through ctypes, or None where there is none."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks with fallocate(2): a full volume fails now, not half way through, and
    concurrent pwrites into allocated extents cost a fraction of writes into a sparse file's holes
    (ext4: about a quarter of the system time). A filesystem without fallocate keeps the sparse file."""
    fallocate = getattr(_libc(), "fallocate", None)
    if size <= 0 or fallocate is None:
        return
    if fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, os.strerror(code))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to the device (sync_file_range(2), asynchronous): the
    final fsync then waits for what is left instead of the whole file. Best effort; a no-op elsewhere."""
    sync_file_range = getattr(_libc(), "sync_file_range", None)
    if sync_file_range is None or length <= 0:
        return
    sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), ctypes.c_uint(SYNC_FILE_RANGE_WRITE))


class PartFile:
    """`.staging/<rev>/parts/<id>.part`: one file's bytes while they arrive."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd: int | None = None

    @property
    def complete_size(self) -> bool:
        return is_regular_file_of_size(self.path, self.size)

    def blocks_on_disk(self) -> int:
        """Bytes the part file already occupies (written, or preallocated by an earlier run)."""
        try:
            info = os.lstat(self.path)
        except OSError:
            return 0
        return info.st_blocks * 512 if stat.S_ISREG(info.st_mode) else 0

    def open(self, keep: bool) -> None:
        """Open it, pre-sized; `keep` the bytes already there (resuming), else start from an empty file."""
        if not keep:
            self.path.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
            preallocate(fd, self.size)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def write(self, data: memoryview, offset: int) -> None:
        assert self.fd is not None
        while data:
            written = os.pwrite(self.fd, data, offset)
            data = data[written:]
            offset += written

    def start_writeback(self, offset: int, length: int) -> None:
        if self.fd is not None:
            start_writeback(self.fd, offset, length)

    def length_now(self) -> int:
        assert self.fd is not None
        return os.fstat(self.fd).st_size

    def sync(self) -> None:
        assert self.fd is not None
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def detach(self, ranges: list[tuple[int, int]]) -> None:
        """Give the bytes in `ranges` a file (inode) of their own, renamed over this one's name.

        After a lease takeover the previous holder may be frozen, not dead: when it wakes, its in-flight
        pwrites still land in the file it has open. Copying the recorded ranges into a new inode leaves the
        old holder writing into an unlinked one nobody reads. Raises EOFError if the file is shorter than
        the ranges say.
        """
        fresh = self.path.with_name(self.path.name + ".detached")
        source = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            target = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(target, self.size)
                for start, end in ranges:
                    copy_range(source, target, start, end - start)
            finally:
                os.close(target)
        finally:
            os.close(source)
        os.replace(fresh, self.path)

    def move_into(self, tree: Path, relative: str) -> None:
        """Rename the finished file to `tree/relative` (directories made without following symlinks)."""
        parent, _, name = relative.rpartition("/")
        target_dir = safe_makedirs(tree, parent) if parent else tree
        os.replace(self.path, target_dir / name)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
