"""`weightsync gc --dest DIR --keep N [--staging-older-than SECONDS]`: give disk space back.

Per model under DEST (or only --name), it removes

* published revisions beyond the N newest that nothing points at: never the one
  `current` points to, never one a `refs/` entry names (offline starts need it),
  never one whose lock another process holds (a sync or repair in progress);
* staging directories untouched for longer than --staging-older-than (abandoned
  by a pod that died and never came back), unless their lock is held;
* leftovers of interrupted repairs in `.trash/`.

Each revision is removed under its own lock: renamed into `.trash/` in one step
(readers see it complete or gone), then deleted. If `current` flipped to it in
the meantime (a warm start of a pinned revision takes no lock), it is renamed back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from weightsync.errors import UsageError
from weightsync.layout import SAFE_NAME, ModelVolume
from weightsync.locking import describe_holder, try_lock
from weightsync.manifest import Manifest, ManifestError
from weightsync.progress import human_bytes

log = logging.getLogger("weightsync")


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _newest_mtime(path: Path) -> float:
    newest = os.lstat(path).st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _models(dest: Path, name: str | None) -> list[str]:
    if name:
        if not SAFE_NAME.match(name):
            raise UsageError(f"--name {name!r} must be one directory name of letters, digits, '.', '_' or '-'")
        return [name] if _is_real_dir(dest / name) else []
    return sorted(p.name for p in dest.iterdir()
                  if SAFE_NAME.match(p.name) and _is_real_dir(p)
                  and (_is_real_dir(p / "revisions") or _is_real_dir(p / ".staging")))


def _referenced(volume: ModelVolume) -> dict[str, str]:
    """revision -> why it must stay (current, or the refs that name it)."""
    reasons: dict[str, str] = {}
    refs = volume.root / "refs"
    if _is_real_dir(refs):
        for entry in sorted(refs.iterdir()):
            revision = volume.read_ref(entry.name) if entry.is_file() and not entry.is_symlink() else None
            if revision:
                reasons.setdefault(revision, f"named by refs/{entry.name}")
    current = volume.current_revision()
    if current:
        reasons[current] = "current"
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
            lease_timeout: float = 60.0) -> int:
    dest = dest.absolute()
    if not _is_real_dir(dest):
        raise UsageError(f"--dest {dest} is not a directory")
    freed = removed = 0
    for model in _models(dest, name):
        volume = ModelVolume(dest, model)
        trash = volume.root / ".trash"
        if _is_real_dir(trash):
            for leftover in trash.iterdir():
                freed += _remove(leftover)
        revisions_dir = volume.root / "revisions"
        if _is_real_dir(revisions_dir):
            for entry in revisions_dir.iterdir():
                if entry.is_symlink():  # not something weightsync makes: drop the link, never its target
                    log.warning("gc: removing symlink %s planted in the revisions directory", entry)
                    entry.unlink()
            reasons = _referenced(volume)
            newest_first = sorted(volume.revisions(), key=lambda r: _age_key(volume, r), reverse=True)
            for index, revision in enumerate(newest_first):
                if revision in reasons:
                    log.info("gc: keeping %s revision %s (%s)", model, revision, reasons[revision])
                elif index < keep:
                    log.info("gc: keeping %s revision %s (one of the %d newest)", model, revision, keep)
                else:
                    size = _remove_revision(volume, revision, lock_mode, lease_timeout)
                    if size is not None:
                        freed, removed = freed + size, removed + 1
        staging = volume.root / ".staging"
        if _is_real_dir(staging):
            now = time.time()
            for entry in sorted(staging.iterdir()):
                if entry.is_symlink() or not entry.is_dir():
                    entry.unlink()
                    continue
                age = now - _newest_mtime(entry)
                if age < staging_older_than:
                    log.info("gc: keeping staging %s of %s (touched %.0fs ago)", entry.name, model, age)
                    continue
                with try_lock(volume.lock_path(entry.name), lock_mode, lease_timeout) as taken:
                    if not taken:
                        log.info("gc: keeping staging %s of %s: in use by %s", entry.name, model,
                                 describe_holder(volume.lock_path(entry.name)))
                        continue
                    size = _remove(entry)
                    freed += size
                    log.info("gc: removed abandoned staging %s of %s (%s, untouched for %.0fs)", entry.name, model,
                             human_bytes(size), age)
    log.info("gc: removed %d revisions, freed %s on %s", removed, human_bytes(freed), dest)
    return 0


def _remove_revision(volume: ModelVolume, revision: str, lock_mode: str, lease_timeout: float) -> int | None:
    lock = volume.lock_path(revision)
    with try_lock(lock, lock_mode, lease_timeout) as taken:
        if not taken:
            log.info("gc: keeping %s revision %s: in use by %s", volume.name, revision, describe_holder(lock))
            return None
        directory = volume.revision_dir(revision)
        aside = volume.ensure(".trash") / f"{revision}.gc.{os.getpid()}"
        os.rename(directory, aside)
        if volume.current_revision() == revision:  # a warm start flipped `current` to it meanwhile
            os.rename(aside, directory)
            log.info("gc: keeping %s revision %s (it just became current)", volume.name, revision)
            return None
        for suffix in (".json", ".verified"):
            (volume.root / "manifests" / f"{revision}{suffix}").unlink(missing_ok=True)
        size = _remove(aside)
        log.info("gc: removed %s revision %s (%s)", volume.name, revision, human_bytes(size))
        print(directory, flush=True)
        return size


def _remove(path: Path) -> int:
    """Delete a file or tree without following symlinks; return the bytes it held."""
    if path.is_symlink() or not path.is_dir():
        size = os.lstat(path).st_size if path.is_file() and not path.is_symlink() else 0
        path.unlink(missing_ok=True)
        return size
    size = _size(path)
    shutil.rmtree(path, ignore_errors=True)
    return size
