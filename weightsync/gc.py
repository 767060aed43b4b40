"""`weightsync gc --dest DIR --keep N [--staging-older-than SECONDS]`: give disk space back.

Per model under DEST (or only --name), it removes

* published revisions beyond the N newest that nothing points at: never the one
  `current` points to, never one a `refs/` entry names (offline starts need it),
  never one whose lock another process holds (a sync or repair in progress);
* staging directories untouched for longer than --staging-older-than (abandoned
  by a pod that died and never came back), unless their lock is held;
* leftovers of interrupted repairs in `.trash/`.

`--dry-run` walks the same decisions, prints the same lines ("would remove") and the space that would be
freed, and removes nothing.

Each revision is removed under its own lock: renamed into `.trash/` in one step
(readers see it complete or gone), then deleted. If `current` flipped to it in
the meantime (a warm start of a pinned revision takes no lock), it is renamed back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from weightsync.errors import UsageError
from weightsync.layout import REVISIONS, SAFE_NAME, ModelVolume, is_real_dir, volumes
from weightsync.locking import DEFAULT_LEASE_TIMEOUT, describe_holder, try_lock
from weightsync.logs import counted, event, human_bytes
from weightsync.manifest import Manifest, ManifestError

log = logging.getLogger("weightsync")


class _Freed:
    """The disk space removals really give back, and the removals themselves (none with --dry-run).

    Revisions share unchanged files as hardlinks, so deleting a path frees its blocks only once the last
    link to its inode is gone: an inode counts when this gc has removed as many links as it had.
    """

    def __init__(self, dry_run: bool = False) -> None:
        self.dry_run = dry_run
        self.links: dict[tuple[int, int], tuple[int, int, int]] = {}  # inode -> (links, links removed, bytes)
        self.total = 0

    def note(self, path: str) -> int:
        """Account for one path about to be removed; return the bytes that frees now."""
        try:
            info = os.lstat(path)
        except OSError:
            return 0
        used = info.st_blocks * 512
        if info.st_nlink <= 1:
            self.total += used
            return used
        key = (info.st_dev, info.st_ino)
        links, removed, _ = self.links.get(key, (info.st_nlink, 0, used))
        removed += 1
        self.links[key] = (links, removed, used)
        if removed < links:
            return 0
        self.total += used
        return used

    def tree(self, path: Path) -> int:
        freed = 0
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                freed += self.note(os.path.join(dirpath, name))
        return freed


def _newest_mtime(path: Path) -> float:
    newest = os.lstat(path).st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _volumes(dest: Path, name: str | None) -> list[ModelVolume]:
    """The models to collect: --name's (a DEST/<name>, or a hub cache repo folder), or every one on DEST."""
    if name:
        if not SAFE_NAME.match(name):
            raise UsageError(f"--name {name!r} must be one directory name of letters, digits, '.', '_' or '-'")
        return [volume for volume in volumes(dest) if volume.label == name]
    return volumes(dest)


def _referenced(volume: ModelVolume) -> dict[str, str]:
    """revision -> why it must stay (current, or the refs that name it)."""
    reasons: dict[str, str] = {}
    refs = volume.root / "refs"
    if is_real_dir(refs):
        for entry in sorted(refs.iterdir()):
            revision = volume.read_ref(entry.name) if entry.is_file() and not entry.is_symlink() else None
            if revision:
                reasons.setdefault(revision, f"named by refs/{entry.name}")
    current = volume.current_revision()
    if current:
        reasons[current] = "current"
    if volume.in_hub_cache:  # huggingface_hub's tools own the cache: a snapshot there keeps its revision here
        for revision in volume.revisions():
            with contextlib.suppress(ManifestError):
                commit = Manifest.load(volume.manifest_path(revision)).revision
                if os.path.lexists(volume.dest / "snapshots" / commit):
                    reasons.setdefault(revision, f"in the Hugging Face cache as snapshots/{commit} (remove it "
                                                 "with `hf cache delete` first)")
    return reasons


def _age_key(volume: ModelVolume, revision: str) -> float:
    try:
        return Manifest.load(volume.manifest_path(revision)).created
    except ManifestError:
        try:
            return os.lstat(volume.revision_dir(revision)).st_mtime
        except OSError:
            return 0.0


def collect(dest: Path, keep: int, staging_older_than: float, name: str | None = None, lock_mode: str = "auto",
            lease_timeout: float = DEFAULT_LEASE_TIMEOUT, dry_run: bool = False) -> int:
    """Remove what nothing needs; with `dry_run`, say what that would be and remove nothing."""
    dest = dest.absolute()
    if not is_real_dir(dest):
        raise UsageError(f"--dest {dest} is not a directory")
    freed, removed = _Freed(dry_run), 0
    verb = "would remove" if dry_run else "removed"
    for volume in _volumes(dest, name):
        trash = volume.trash
        if is_real_dir(trash):
            for leftover in trash.iterdir():
                _remove(leftover, freed)
        revisions_dir = volume.root / REVISIONS
        if is_real_dir(revisions_dir):
            for entry in revisions_dir.iterdir():
                if entry.is_symlink():  # not something weightsync makes: drop the link, never its target
                    log.warning("gc: %s symlink %s planted in the revisions directory", verb, entry)
                    _remove(entry, freed)
            reasons = _referenced(volume)
            newest_first = sorted(volume.revisions(), key=lambda r: _age_key(volume, r), reverse=True)
            for index, revision in enumerate(newest_first):
                if revision in reasons:
                    log.info("gc: keeping %s revision %s (%s)", volume.label, revision, reasons[revision])
                elif index < keep:
                    log.info("gc: keeping %s revision %s (one of the %d newest)", volume.label, revision, keep)
                else:
                    if _remove_revision(volume, revision, lock_mode, lease_timeout, freed):
                        removed += 1
        staging = volume.staging_root
        if is_real_dir(staging):
            now = time.time()
            for entry in sorted(staging.iterdir()):
                if entry.is_symlink() or not entry.is_dir():
                    _remove(entry, freed)
                    continue
                age = now - _newest_mtime(entry)
                if age < staging_older_than:
                    log.info("gc: keeping staging %s of %s (touched %.0fs ago)", entry.name, volume.label, age)
                    continue
                with try_lock(volume.lock_path(entry.name), lock_mode, lease_timeout) as taken:
                    if not taken:
                        log.info("gc: keeping staging %s of %s: in use by %s", entry.name, volume.label,
                                 describe_holder(volume.lock_path(entry.name)))
                        continue
                    size = _remove(entry, freed)
                    log.info("gc: %s abandoned staging %s of %s (%s, untouched for %.0fs)", verb, entry.name,
                             volume.label, human_bytes(size), age)
    event("gc", "gc: %s %s, %s %s on %s (files still linked from kept revisions count as not freed)", verb,
          counted(removed, "revision"), "would free" if dry_run else "freed", human_bytes(freed.total), dest,
          revisions_removed=removed, bytes_freed=freed.total, dest=str(dest), dry_run=dry_run)
    return 0


def _remove_revision(volume: ModelVolume, revision: str, lock_mode: str, lease_timeout: float,
                     freed: _Freed) -> bool:
    lock = volume.lock_path(revision)
    with try_lock(lock, lock_mode, lease_timeout) as taken:
        if not taken:
            log.info("gc: keeping %s revision %s: in use by %s", volume.label, revision, describe_holder(lock))
            return False
        directory = volume.revision_dir(revision)
        if freed.dry_run:
            size = freed.tree(directory)
            log.info("gc: would remove %s revision %s (would free %s)", volume.label, revision, human_bytes(size))
            print(directory, flush=True)
            return True
        aside = volume.trash_path(f"{revision}.gc.{os.getpid()}")
        os.rename(directory, aside)
        if volume.current_revision() == revision:  # a warm start flipped `current` to it meanwhile
            os.rename(aside, directory)
            log.info("gc: keeping %s revision %s (it just became current)", volume.label, revision)
            return False
        for path in (volume.manifest_path(revision), volume.verified_path(revision)):
            path.unlink(missing_ok=True)
        size = _remove(aside, freed)
        log.info("gc: removed %s revision %s (freed %s)", volume.label, revision, human_bytes(size))
        print(directory, flush=True)
        return True


def _remove(path: Path, freed: _Freed) -> int:
    """Delete a file or tree without following symlinks; return the bytes that freed."""
    if path.is_symlink() or not path.is_dir():
        size = freed.note(str(path))
        if not freed.dry_run:
            path.unlink(missing_ok=True)
        return size
    size = freed.tree(path)
    if not freed.dry_run:
        shutil.rmtree(path, ignore_errors=True)
    return size
