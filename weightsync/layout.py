"""The volume layout: where published revisions, manifests, staging and locks live.

    DEST/<name>/
      current -> revisions/<rev>     stable path, a relative symlink flipped atomically
      revisions/<rev>/               complete, verified, immutable model files (MODEL_DIR)
      manifests/<rev>.json           path, size and sha256 of every file of <rev>
      refs/<branch>                  the revision a branch/tag resolved to (offline starts)
      .staging/<rev>/tree/           verified files waiting for publish
      .staging/<rev>/parts/          <id>.part data + <id>.json resume state
      .locks/<rev>.lock              one downloader per (name, revision)

A revision directory appears only by one rename of a complete, verified tree, so
MODEL_DIR and `current` never show a partial model, whatever is killed when.
Nothing here follows a symlink out of DEST: directories are checked with lstat.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from weightsync.config import RevisionKey
from weightsync.errors import DiskSpaceError, IntegrityError, UsageError, WeightsyncError
from weightsync.fsutil import read_nofollow, write_atomic

# The directories of one model, relative to DEST/<name>/ (the module docstring draws them).
REVISIONS, MANIFESTS, REFS, STAGING, LOCKS, TRASH = "revisions", "manifests", "refs", ".staging", ".locks", ".trash"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f]")
MAX_PATH_BYTES = 4000
MAX_COMPONENT_BYTES = 255


def check_relative_path(path: str, origin: str) -> str:
    """Refuse any source name that could land outside DEST or is not portable; return it unchanged."""
    problem = None
    if not path:
        problem = "is empty"
    elif CONTROL_CHARACTER.search(path):
        problem = "contains a NUL or control character"
    elif "\\" in path:
        problem = "contains a backslash"
    elif path.startswith("/"):
        problem = "is absolute"
    elif len(path.encode()) > MAX_PATH_BYTES:
        problem = f"is longer than {MAX_PATH_BYTES} bytes"
    else:
        for part in path.split("/"):
            if part in ("", ".", ".."):
                problem = "contains an empty, '.' or '..' component"
                break
            if len(part.encode()) > MAX_COMPONENT_BYTES:
                problem = f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
                break
    if problem:
        raise IntegrityError(f"refusing file {path!r} from {origin}: its name {problem}, so it could land "
                             "outside the destination; fix or exclude it at the source (--exclude)")
    return path


def check_listing(paths: list[str], origin: str) -> None:
    """Refuse a listing where one file's path is another's directory (a and a/b)."""
    names = set(paths)
    for path in paths:
        check_relative_path(path, origin)
        for parent in PurePosixPath(path).parents:
            if str(parent) != "." and str(parent) in names:
                raise IntegrityError(f"refusing listing from {origin}: {str(parent)!r} is both a file and the "
                                     f"directory of {path!r}; fix the source or --exclude one of them")


def safe_makedirs(base: Path, relative: str) -> Path:
    """Create base/relative directory by directory, refusing any existing symlink on the way."""
    current = base
    for part in PurePosixPath(relative).parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(current, 0o755)
            info = os.lstat(current)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise IntegrityError(f"refusing to write through {current}: it is a symlink or not a directory "
                                 "(planted on the volume?); remove it and rerun")
    return current


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def require_volume(dest: Path) -> None:
    """For commands that only read a volume (status, verify): DEST must be an existing directory."""
    if not dest.is_dir():
        raise UsageError(f"--dest {dest} does not exist or is not a directory; point it at the volume")


def _holds_a_model(directory: Path) -> bool:
    return is_real_dir(directory) and (is_real_dir(directory / REVISIONS) or is_real_dir(directory / STAGING))


def model_names(dest: Path) -> list[str]:
    """The models on a volume: real directories (no symlink) holding revisions or staging."""
    try:
        children = sorted(dest.iterdir())
    except OSError:
        return []
    return [child.name for child in children if SAFE_NAME.match(child.name) and _holds_a_model(child)]


HUB_CACHE_REPO = re.compile(r"^(models|datasets|spaces)--[A-Za-z0-9][A-Za-z0-9._-]*(--[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_CACHE_VOLUME = "weightsync"  # weightsync's volume inside a hub cache repo folder (hfcache.py)


def volumes(dest: Path) -> list[ModelVolume]:
    """Every model on DEST: the native layout's DEST/<name>, and the hub cache layout's
    DEST/models--owner--name/weightsync (labelled by the repo folder)."""
    found = [ModelVolume(dest, name) for name in model_names(dest)]
    try:
        children = sorted(dest.iterdir())
    except OSError:
        return found
    for child in children:
        if HUB_CACHE_REPO.match(child.name) and is_real_dir(child) and _holds_a_model(child / HUB_CACHE_VOLUME):
            found.append(ModelVolume(child, HUB_CACHE_VOLUME, label=child.name))
    return found


class ModelVolume:
    """Paths and atomic operations for one model (one --name) on the volume."""

    def __init__(self, dest: Path, name: str, label: str | None = None) -> None:
        if not SAFE_NAME.match(name):
            raise UsageError(f"--name {name!r} must be one directory name of letters, digits, '.', '_' or '-'")
        self.dest = dest
        self.name = name
        self.label = label or name  # what messages and `status` call it (a hub cache repo folder's name)
        self.root = dest / name
        self.current = self.root / "current"

    @property
    def in_hub_cache(self) -> bool:
        """This volume is weightsync's own inside a hub cache repo folder (--layout hf-cache)."""
        return self.name == HUB_CACHE_VOLUME and bool(HUB_CACHE_REPO.match(self.dest.name))

    def revision_dir(self, key: RevisionKey) -> Path:
        return self.root / REVISIONS / key

    def manifest_path(self, key: RevisionKey) -> Path:
        return self.root / MANIFESTS / f"{key}.json"

    def verified_path(self, key: RevisionKey) -> Path:
        """When every byte of the revision was last hashed (`weightsync status`)."""
        return self.root / MANIFESTS / f"{key}.verified"

    def trash_path(self, label: str) -> Path:
        """A place to move a revision or staging tree into, in one rename, before it is deleted."""
        return self.ensure(TRASH) / label

    @property
    def trash(self) -> Path:
        return self.root / TRASH

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS

    def staging_dir(self, key: RevisionKey) -> Path:
        return self.root / STAGING / key

    def make_staging(self, key: RevisionKey) -> tuple[Path, Path, Path]:
        """Create `.staging/<key>/` with `parts/` (downloads in progress) and `tree/` (verified files, renamed
        into revisions/ in one step at publish); return the three, none reached through a symlink."""
        return (self.ensure(f"{STAGING}/{key}"), self.ensure(f"{STAGING}/{key}/parts"),
                self.ensure(f"{STAGING}/{key}/tree"))

    def lock_path(self, key: RevisionKey) -> Path:
        return self.root / LOCKS / f"{key}.lock"

    def ref_path(self, ref: str) -> Path:
        return self.root / REFS / quote(ref, safe="")

    def check_dest(self) -> None:
        """Refuse, before any request, a --dest that can never hold a volume: a file, a dangling symlink."""
        if os.path.lexists(self.dest) and not self.dest.is_dir():
            if self.dest.is_symlink() and not self.dest.exists():
                raise UsageError(f"--dest {self.dest} is a symlink to {os.readlink(self.dest)}, which does not "
                                 "exist; point --dest at the volume's mount point")
            raise UsageError(f"--dest {self.dest} is not a directory (a regular file?); point --dest at the "
                             "volume's mount point")

    def ensure(self, relative: str = "") -> Path:
        """Create DEST/<name>/<relative> safely (no symlink followed) and return it."""
        try:
            self.dest.mkdir(mode=0o755, parents=True, exist_ok=True)
            path = safe_makedirs(self.dest, self.name)
            if relative:
                path = safe_makedirs(self.root, relative)
        except OSError as exc:
            raise self._unwritable(exc) from exc
        return path

    def _unwritable(self, exc: OSError) -> WeightsyncError:
        """What a failure to create a directory on the volume means, said as what to do about it."""
        where = exc.filename or self.root
        if exc.errno in (errno.EACCES, errno.EPERM):
            return UsageError(f"--dest {self.dest} is not writable by this process (uid {os.geteuid()}, gid "
                              f"{os.getegid()}): cannot create {where}; in Kubernetes set the pod's "
                              "securityContext.fsGroup (the chart does), or chown the volume")
        if exc.errno == errno.EROFS:
            return UsageError(f"--dest {self.dest} is mounted read-only and {self.name} is not published there "
                              "yet: mount it read-write for the first sync (read-only is fine once it is)")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskSpaceError(f"no space left on --dest {self.dest} to create {where}; grow the volume or "
                                  "remove old revisions (weightsync gc)")
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            return UsageError(f"cannot create {where}: a file is in the way ({exc.strerror}); point --dest at "
                              "the volume's mount point")
        return WeightsyncError(f"cannot create {where}: {exc.strerror}; check that --dest is a writable volume")

    def is_real_revision(self, key: RevisionKey) -> bool:
        """revisions/<key> is a directory reached without any symlink (DEST/<name>, revisions, itself)."""
        for path in (self.root, self.root / REVISIONS, self.revision_dir(key), self.root / MANIFESTS):
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    return False
            except OSError:
                return False
        return True

    def current_revision(self) -> str | None:
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        parts = PurePosixPath(target).parts
        if len(parts) == 2 and parts[0] == REVISIONS and SAFE_NAME.match(parts[1]):
            return parts[1]
        return None

    def point_current_at(self, key: RevisionKey) -> None:
        """Flip `current` to revisions/<key> in one rename (readers see old or new, never none)."""
        if self.current_revision() == key:
            return
        temporary = self.root / f".current.{os.getpid()}.tmp"
        try:
            temporary.unlink(missing_ok=True)
            os.symlink(f"{REVISIONS}/{key}", temporary)
            os.replace(temporary, self.current)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise WeightsyncError(f"cannot update {self.current}: {exc.strerror}") from exc

    def record_ref(self, ref: str, revision: str) -> None:
        """Remember which revision a branch/tag resolved to, for --offline starts."""
        if self.read_ref(ref) != revision:
            self.ensure(REFS)
            write_atomic(self.ref_path(ref), revision.encode() + b"\n")

    def read_ref(self, ref: str) -> str | None:
        try:
            value = read_nofollow(self.ref_path(ref), limit=4096).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return value if SAFE_NAME.match(value) else None

    def revisions(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / REVISIONS).iterdir() if p.is_dir())
        except OSError:
            return []
