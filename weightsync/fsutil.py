"""Safe-file helpers: every read and write weightsync does on a shared volume goes through these.

A volume may be shared with other pods, other users and a careless shell, so
nothing here follows a symlink planted in a file's place, blocks on a FIFO put
there, or leaves a torn file behind a crash. Kept free of weightsync imports, so
any module (layout, manifest, locking, fetch, engine) can use them without a cycle.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path


class NotRegularFileError(OSError):
    """A FIFO, device or directory sits where a regular file was expected."""


def read_nofollow(path: Path, limit: int = 256 * 1024 * 1024) -> bytes:
    """A regular file's bytes (at most `limit`), refusing a symlink (ELOOP) or a FIFO/device planted in its
    place, which would otherwise be followed or block the reader forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{path} is not a regular file")
        return handle.read(limit)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, durable: bool = True) -> None:
    """Write a small file so readers see the old or the new content, never a torn one.

    `durable=False` skips the fsync: still atomic against a killed process, which is
    all that frequently rewritten resume state needs. The temporary name carries the
    pid and thread, so two writers never share one.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def is_regular_file_of_size(path: Path, size: int) -> bool:
    """Whether `path` itself (not a symlink's target) is a regular file of exactly `size` bytes."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == size


def copy_range(source: int, target: int, offset: int, length: int) -> None:
    """Copy `length` bytes at `offset` between two open files, in the kernel where it can (copy_file_range)."""
    done = 0
    while done < length:
        try:
            count = os.copy_file_range(source, target, length - done, offset + done, offset + done)
        except OSError:
            data = os.pread(source, min(4 * 1024 * 1024, length - done), offset + done)
            count = os.pwrite(target, data, offset + done) if data else 0
        if not count:
            raise EOFError(f"the source file ends before byte {offset + done}")
        done += count


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(tree: Path) -> None:
    for dirpath, _, _ in os.walk(tree):
        fsync_dir(Path(dirpath))


def make_read_only(tree: Path) -> None:
    """Files under `tree` become read-only (0444): a server or a shell cannot rewrite them by accident.
    Directories stay writable by their owner, so whole trees can still be moved and deleted."""
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o222:
                os.chmod(path, mode & ~0o222)


def disk_usage(tree: Path) -> int:
    """Bytes the files under `tree` occupy on disk (allocated blocks, not apparent sizes; symlinks not
    followed). Files that vanish meanwhile count as nothing."""
    total = 0
    for dirpath, _, filenames in os.walk(tree):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total
