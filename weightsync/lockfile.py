"""Pinned lockfiles: the exact revision and every file's path, size and sha256, checked into git.

`weightsync lock` writes one; `--lockfile` makes sync/run download exactly that and
fail (exit 4) if the source no longer matches — reproducible, auditable model
versions, like a package lockfile. With the revision already published it needs
no network at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightsync.errors import IntegrityError, UsageError
from weightsync.manifest import SHA256, ManifestEntry
from weightsync.sources import RemoteFile

FORMAT = 1


@dataclass(frozen=True)
class Lockfile:
    source: str
    revision: str
    files: tuple[ManifestEntry, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    origin: str = field(default="", compare=False)

    def to_json(self) -> str:
        body = {
            "weightsync_lockfile": FORMAT,
            "source": self.source,
            "revision": self.revision,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256}
                      for f in sorted(self.files, key=lambda f: f.path)],
        }
        return json.dumps(body, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: str) -> Lockfile:
        from weightsync.layout import check_relative_path

        try:
            body = json.loads(Path(path).read_text())
            if body.get("weightsync_lockfile") != FORMAT:
                raise ValueError(f"not a weightsync lockfile (format {body.get('weightsync_lockfile')!r})")
            files = []
            for item in body["files"]:
                entry = ManifestEntry(path=check_relative_path(item["path"], path), size=int(item["size"]),
                                      sha256=str(item["sha256"]).lower())
                if entry.size < 0 or not SHA256.match(entry.sha256):
                    raise ValueError(f"bad entry for {entry.path!r}")
                files.append(entry)
            return cls(source=str(body["source"]), revision=str(body["revision"]), files=tuple(files),
                       include=tuple(body.get("include") or ()), exclude=tuple(body.get("exclude") or ()),
                       origin=path)
        except OSError as exc:
            raise UsageError(f"cannot read --lockfile {path}: {exc.strerror}") from exc
        except (ValueError, KeyError, TypeError, IntegrityError) as exc:
            raise UsageError(f"--lockfile {path} is malformed: {exc}; regenerate it with `weightsync lock`") from exc

    def check_listing(self, files: tuple[RemoteFile, ...]) -> tuple[RemoteFile, ...]:
        """The source's files with the lockfile's sha256 as their promise; exit 4 on any difference."""
        locked = {f.path: f for f in self.files}
        listed = {f.path: f for f in files}
        problems = [f"{p}: missing at the source" for p in sorted(locked.keys() - listed.keys())]
        problems += [f"{p}: not in the lockfile" for p in sorted(listed.keys() - locked.keys())]
        problems += [f"{p}: size {listed[p].size}, lockfile says {locked[p].size}"
                     for p in sorted(locked.keys() & listed.keys()) if listed[p].size != locked[p].size]
        for path in sorted(locked.keys() & listed.keys()):
            promised = listed[path].sha256
            if promised and promised != locked[path].sha256:
                problems.append(f"{path}: the source's sha256 differs from the lockfile")
        if problems:
            raise self.mismatch(problems)
        return tuple(RemoteFile(path=f.path, size=f.size, sha256=locked[f.path].sha256, md5=f.md5,
                                git_sha1=f.git_sha1, etag=f.etag) for f in files)

    def check_manifest(self, entries: list[ManifestEntry]) -> None:
        want = {(f.path, f.size, f.sha256) for f in self.files}
        have = {(f.path, f.size, f.sha256) for f in entries}
        if want != have:
            problems = [f"{p}: not as locked" for p, _, _ in sorted(want ^ have)]
            raise self.mismatch(sorted(set(problems)))

    def mismatch(self, problems: list[str]) -> IntegrityError:
        return IntegrityError(f"{self.source} revision {self.revision} no longer matches --lockfile {self.origin}: "
                              + "; ".join(problems[:8]) + " — regenerate the lockfile or restore the source")
