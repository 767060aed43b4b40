"""The Hugging Face cache layout (`--layout hf-cache`): publish where vLLM, TGI and transformers look a repo up.

    HF_HUB_CACHE/                                  (DEST)
      CACHEDIR.TAG
      .locks/models--org--name/<etag>.lock          huggingface_hub's per-blob lock (flock), honoured here
      models--org--name/                            (datasets--org--name for a dataset)
        blobs/<etag>                                a file's bytes: the LFS sha256, else the git blob sha1
        snapshots/<commit>/<path> -> ../../blobs/<etag>   relative symlinks, one per file
        refs/<branch>                               the commit, no newline (huggingface_hub reads it unstripped)
        weightsync/                                 weightsync's own volume: revisions, manifests, staging, locks

weightsync syncs into its own volume inside the repo folder, with every guarantee of the
native layout (verified before publish, resume, one download per revision, atomic
publish), and then *projects* the published revision into the cache: each file is
hardlinked as its blob (no second copy; same filesystem), the snapshot directory is
built next to it and appears under snapshots/ by one rename, and only then is the ref
written. huggingface_hub returns a snapshot directory as soon as it exists, so it must
never exist half-built. `scan_cache_dir` looks only at snapshots/ and refs/ inside a
repo folder, so weightsync/ raises no warning there; nothing is written at the cache
root but CACHEDIR.TAG and .locks/ (anything else would be reported as a broken repo).

Living with huggingface_hub in one cache: a blob it wrote is reused when it hashes to
its name, and replaced (atomically, under its lock) only when it does not; a snapshot
it wrote is completed in place, never removed. No `trees/<commit>.json` is written: it
would make huggingface_hub demand every file of the commit, and a filtered sync has fewer.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from weightsync.checksums import ALGORITHMS, feed_file
from weightsync.errors import UsageError, WeightsyncError
from weightsync.layout import HUB_CACHE_VOLUME

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
CACHEDIR_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# This file is a cache directory tag created by huggingface_hub.\n"
                "# For information about cache directory tags, see https://bford.info/cachedir/\n")


def repo_folder(repo_id: str, repo_type: str = "model") -> str:
    """`models--org--name`, as huggingface_hub names a repo's folder; refuses an id it could not map back."""
    if not REPO_ID.match(repo_id) or "--" in repo_id or repo_id.endswith((".", "-")):
        raise UsageError(f"--repo-id {repo_id!r} is not a Hub repo id; use owner/name (letters, digits, '.', '_', "
                         "'-'; no '--')")
    return "--".join([f"{repo_type}s", *repo_id.split("/")])


def repo_id_of(folder: str) -> str:
    """`models--org--name` -> `org/name`: the inverse of `repo_folder`."""
    return folder.split("--", 1)[1].replace("--", "/")


@dataclass(frozen=True)
class CachedFile:
    """One file to publish: its path in the repo, size, blob name (etag) and where its verified bytes are."""

    path: str
    size: int
    etag: str
    verified_copy: Path


@dataclass(frozen=True)
class HubCache:
    """One repo's folder in a hub cache directory."""

    cache: Path
    folder: str

    @property
    def repo(self) -> Path:
        return self.cache / self.folder

    def blob(self, etag: str) -> Path:
        return self.repo / "blobs" / etag

    def snapshot_dir(self, commit: str) -> Path:
        return self.repo / "snapshots" / commit

    def ref_path(self, ref: str) -> Path:
        return self.repo / "refs" / ref

    def is_published(self, commit: str, ref: str | None, files: list[tuple[str, int]]) -> bool:
        """The snapshot holds every file at its size (through its blob) and the ref names the commit: a warm start
        then touches nothing. One stat per file, following the symlink."""
        snapshot = self.snapshot_dir(commit)
        for path, size in files:
            try:
                if os.stat(snapshot / path).st_size != size:
                    return False
            except OSError:
                return False
        return ref is None or self._read_ref(ref) == commit

    def publish(self, commit: str, ref: str | None, files: list[CachedFile]) -> Path:
        """Blobs, then the snapshot (one rename, or completed in place), then the ref; returns the snapshot dir."""
        _check_segment(commit, "commit")
        try:
            self._tag_cache()
            blobs = self._ensure(self.repo / "blobs")
            for item in files:
                self._place_blob(blobs, item)
            snapshot = self._publish_snapshot(commit, files)
            if ref is not None:
                self._write_ref(ref, commit)
        except OSError as exc:
            raise WeightsyncError(f"cannot publish into the Hugging Face cache at {self.repo}: {exc.strerror or exc} "
                                  f"({exc.filename or ''}); check that --dest is writable") from exc
        return snapshot

    # -- blobs -------------------------------------------------------------------------
    def _place_blob(self, blobs: Path, item: CachedFile) -> None:
        """blobs/<etag> as a hardlink of the verified copy, unless a blob of that name already holds those bytes."""
        blob = blobs / item.etag
        if _same_file(blob, item.verified_copy):
            return
        with self._blob_lock(item.etag):
            if os.path.lexists(blob):
                if _holds(blob, item):
                    return  # huggingface_hub's (or an earlier revision's) blob, and it is right: keep it
                # A blob whose bytes do not hash to its name would be served through the snapshot: replace it.
                temporary = blobs / f"{item.etag}.weightsync-{os.getpid()}.tmp"
                temporary.unlink(missing_ok=True)
                os.link(item.verified_copy, temporary)
                os.replace(temporary, blob)
                return
            os.link(item.verified_copy, blob)

    @contextlib.contextmanager
    def _blob_lock(self, etag: str) -> Iterator[None]:
        """huggingface_hub's lock for writing this blob: `.locks/<folder>/<etag>.lock`, flock(LOCK_EX), 0664."""
        import fcntl

        directory = self._ensure(self.cache / ".locks" / self.folder)
        descriptor = os.open(directory / f"{etag}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o664)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the flock; the file stays, as huggingface_hub leaves it

    # -- the snapshot ---------------------------------------------------------------------
    def _publish_snapshot(self, commit: str, files: list[CachedFile]) -> Path:
        snapshots = self._ensure(self.repo / "snapshots")
        snapshot = snapshots / commit
        if not os.path.lexists(snapshot):
            stage = self._ensure(self.repo / HUB_CACHE_VOLUME / ".snapshots") / f"{commit}.{os.getpid()}"
            _remove_tree(stage)
            os.mkdir(stage)
            _link_files(stage, files)
            try:
                os.rename(stage, snapshot)  # the whole snapshot appears at once
                return snapshot
            except OSError:  # another sync (or huggingface_hub) created it meanwhile: complete that one
                _remove_tree(stage)
        if not stat.S_ISDIR(os.lstat(snapshot).st_mode):
            raise WeightsyncError(f"{snapshot} is not a directory; remove it and rerun")
        _link_files(snapshot, files)
        return snapshot

    # -- refs and the cache tag -------------------------------------------------------------
    def _read_ref(self, ref: str) -> str | None:
        try:
            return self.ref_path(ref).read_text()
        except OSError:
            return None

    def _write_ref(self, ref: str, commit: str) -> None:
        if self._read_ref(ref) == commit:
            return
        for part in PurePosixPath(ref).parts:
            _check_segment(part, "ref")
        path = self.ref_path(ref)
        self._ensure(path.parent)
        temporary = path.parent / f".{path.name}.weightsync-{os.getpid()}.tmp"
        temporary.write_text(commit)  # no newline: huggingface_hub and TGI's router read the file unstripped
        os.replace(temporary, path)

    def _tag_cache(self) -> None:
        self._ensure(self.cache)
        tag = self.cache / "CACHEDIR.TAG"
        if not os.path.lexists(tag):
            with contextlib.suppress(FileExistsError), open(tag, "x") as handle:
                handle.write(CACHEDIR_TAG)

    @staticmethod
    def _ensure(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        if os.path.islink(directory) or not directory.is_dir():
            raise WeightsyncError(f"refusing to write through {directory}: it is a symlink or not a directory")
        return directory


def link_target(path: str, etag: str) -> str:
    """The relative symlink huggingface_hub writes: `../../blobs/<etag>`, one more `../` per directory level."""
    return "../" * (2 + path.count("/")) + f"blobs/{etag}"


def _link_files(snapshot: Path, files: list[CachedFile]) -> None:
    """Every file's symlink in `snapshot`, creating what is missing; a broken or foreign link is replaced."""
    for item in files:
        link = snapshot / item.path
        target = link_target(item.path, item.etag)
        link.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(link):
            if os.readlink(link) == target:
                continue
        elif os.path.isfile(link) and os.path.getsize(link) == item.size:
            continue  # a regular file huggingface_hub copied in (no symlinks there); left as it is
        temporary = link.parent / f".{link.name}.weightsync-{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)
        os.symlink(target, temporary)
        os.replace(temporary, link)


def _same_file(one: Path, other: Path) -> bool:
    try:
        return os.path.samefile(one, other)
    except OSError:
        return False


def _holds(blob: Path, item: CachedFile) -> bool:
    """Whether an existing blob's bytes hash to its name (sha256, or git's blob sha1 for a 40-hex name)."""
    digest = ALGORITHMS["git-sha1" if len(item.etag) == 40 else "sha256"].new(item.size)
    try:
        if os.stat(blob).st_size != item.size:
            return False
        feed_file(blob, digest.update)
    except OSError:
        return False
    return digest.digest().hex() == item.etag


def _check_segment(name: str, what: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise UsageError(f"{what} {name!r} cannot name a directory in the Hugging Face cache")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
