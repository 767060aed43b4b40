"""Local folder source: `file:///abs/path` or a plain directory path.

Useful for a model already on a node (hostPath, NFS) that must be copied,
verified and published like any other. The revision is a digest of the listing
(path, size, mtime), so an edited folder yields a new revision.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

from weightsync.errors import SourceError, UsageError
from weightsync.sources import LISTING_DIGEST, Features, RemoteFile, Selection, Snapshot, listing_digest, slugify

# `owner/name`: what a Hub repo id or a bucket/prefix looks like when its scheme was forgotten.
REPO_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _FileRange:
    """A bounded reader over one byte range of a local file."""

    voids: ClassVar[dict[str, str]] = {}

    def __init__(self, path: Path, start: int, end: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = start
        self._end = end

    def readinto(self, buffer: memoryview) -> int:
        want = min(len(buffer), self._end - self._offset)
        if want <= 0:
            return 0
        count = os.preadv(self._fd, [buffer[:want]], self._offset)
        self._offset += count
        return count

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class FileSource:
    """A folder; each file's locator is its absolute path. It promises no checksum: files are checked by size,
    and their sha256 is computed as they are copied."""

    root: Path
    given: str = ""  # --source as typed, for hints
    kind: str = "file"
    default_ref: str | None = None
    features: ClassVar[Features] = Features()

    @classmethod
    def from_uri(cls, uri: str) -> FileSource:
        if uri.startswith("file://"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise UsageError(f"--source {uri!r}: file:// URIs must be absolute, like file:///models/llama")
            path = Path(unquote(parsed.path))
        else:
            path = Path(uri)
        return cls(root=path.expanduser().absolute(), given=uri)

    @property
    def uri(self) -> str:
        return f"file://{self.root}"

    @property
    def default_name(self) -> str:
        """`file--<folder>-<8 hex of its absolute path>`: two folders called `m` are two models."""
        import hashlib  # OpenSSL's (~4 ms to load): not needed when --name is given

        return f"{slugify('file', self.root.name)}-{hashlib.sha256(str(self.root).encode()).hexdigest()[:8]}"

    def pinned_revision(self, revision: str | None) -> str | None:
        if revision and LISTING_DIGEST.match(revision):
            return revision
        if revision:
            raise UsageError(f"--revision {revision!r} is not a weightsync revision id for a folder "
                             "(20 hex characters, as printed by a previous sync); leave it unset")
        return None

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        if not self.root.is_dir():
            hint = "check --source"
            if REPO_SHAPE.match(self.given):
                hint = (f"for the Hugging Face Hub write hf://{self.given}, for S3 s3://{self.given}; a folder "
                        "needs a path that exists (./name or /abs/path)")
            raise SourceError(f"source folder {self.root} does not exist or is not a directory; {hint}")
        files: list[RemoteFile] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath, name)
                rel = full.relative_to(self.root).as_posix()
                if not selection.matches(rel):
                    continue
                try:
                    info = full.stat()
                except OSError as exc:
                    raise SourceError(f"cannot read {full}: {exc.strerror}") from exc
                files.append(RemoteFile(path=rel, size=info.st_size, etag=f"{info.st_size}-{info.st_mtime_ns}",
                                        locator=str(full)))
        digest = listing_digest([(f.path, f.size, f.etag or "") for f in files])
        return Snapshot(revision=digest, files=tuple(files))

    @staticmethod
    def _walk_error(exc: OSError) -> None:
        raise SourceError(f"cannot list {exc.filename}: {exc.strerror}")

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    def open_range(self, file: RemoteFile, start: int, end: int) -> _FileRange:
        try:
            return _FileRange(Path(file.locator), start, end)
        except FileNotFoundError as exc:
            raise SourceError(f"{file.locator} disappeared from the source during the sync; rerun") from exc
