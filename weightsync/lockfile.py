"""Pinned lockfiles: the exact revision and every file's path, size, sha256 and source promise, checked into git.

`weightsync lock` writes one; `--lockfile` makes sync/run download exactly that and
fail (exit 4) if the source no longer matches — reproducible, auditable model
versions, like a package lockfile. Two things are checked: the bytes against the
locked sha256, and the source's own promise for each file (its ETag, Checksum*
value or LFS oid, as recorded at lock time) against what the source says now, so a
rewritten object is refused before a byte of it is downloaded. With the revision
already published it needs no network at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from weightsync.checksums import Evidence, Promise
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
    signature: dict[str, str] | None = None
    """The signature bundle the revision was locked with (`file`, `sha256`, `signer`, `policy`), if one was checked:
    a sync from this lockfile refuses another bundle."""
    origin: str = field(default="", compare=False)

    def to_json(self) -> str:
        body = {
            "weightsync_lockfile": FORMAT,
            "source": self.source,
            "revision": self.revision,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256,
                       **({"promise": _source_promise(f).to_json()} if _source_promise(f) else {})}
                      for f in sorted(self.files, key=lambda f: f.path)],
        }
        if self.signature:
            body["signature"] = self.signature
        return json.dumps(body, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def load(cls, path: str) -> Lockfile:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read --lockfile {path}: {exc.strerror}") from exc
        try:
            return cls.parse(text, path)
        except (ValueError, KeyError, TypeError, IntegrityError) as exc:
            raise UsageError(f"--lockfile {path} is malformed: {exc}; regenerate it with `weightsync lock`") from exc

    def for_source(self, source: str) -> Lockfile:
        """The same files pinned at another source (`weightsync lock --source URL --lockfile FILE`): their paths,
        sizes and sha256s, without the old source's revision and promises, which mean nothing to the new one."""
        files = tuple(ManifestEntry(path=f.path, size=f.size, sha256=f.sha256) for f in self.files)
        return Lockfile(source=source, revision="", files=files, include=self.include, exclude=self.exclude,
                        signature=self.signature, origin=self.origin)

    @classmethod
    def parse(cls, text: str, path: str) -> Lockfile:
        """A lockfile's text (a file, or a mirror's `weightsync.lock` object); ValueError/KeyError if malformed."""
        from weightsync.layout import check_relative_path

        body = json.loads(text)
        if body.get("weightsync_lockfile") != FORMAT:
            raise ValueError(f"not a weightsync lockfile (format {body.get('weightsync_lockfile')!r})")
        files = []
        for item in body["files"]:
            promise = Promise.from_json(item["promise"]) if item.get("promise") else None
            entry = ManifestEntry(path=check_relative_path(item["path"], path), size=int(item["size"]),
                                  sha256=str(item["sha256"]).lower(),
                                  evidence=Evidence(promise) if promise else None)
            if entry.size < 0 or not SHA256.match(entry.sha256):
                raise ValueError(f"bad entry for {entry.path!r}")
            files.append(entry)
        return cls(source=str(body["source"]), revision=str(body["revision"]), files=tuple(files),
                   include=tuple(body.get("include") or ()), exclude=tuple(body.get("exclude") or ()),
                   signature=_signature(body.get("signature")), origin=path)

    @cached_property
    def by_path(self) -> dict[str, ManifestEntry]:
        return {f.path: f for f in self.files}

    def check_listing(self, files: tuple[RemoteFile, ...]) -> tuple[RemoteFile, ...]:
        """The source's files with the lockfile's sha256 as their promise; exit 4 on any difference."""
        locked = self.by_path
        listed = {f.path: f for f in files}
        problems = [f"{p}: missing at the source" for p in sorted(locked.keys() - listed.keys())]
        problems += [f"{p}: not in the lockfile" for p in sorted(listed.keys() - locked.keys())]
        problems += [f"{p}: size {listed[p].size}, lockfile says {locked[p].size}"
                     for p in sorted(locked.keys() & listed.keys()) if listed[p].size != locked[p].size]
        for path in sorted(locked.keys() & listed.keys()):
            promised = listed[path].sha256
            if promised and promised != locked[path].sha256:
                problems.append(f"{path}: the source's sha256 differs from the lockfile")
            problems += _promise_problems(locked[path], listed[path], missing_ok=True)
        if problems:
            raise self.mismatch(problems)
        return tuple(f.with_promises((*f.promises, Promise("sha256", locked[f.path].sha256, "", origin="lockfile")))
                     for f in files)

    def needs_describe(self, remote: RemoteFile) -> bool:
        """Whether the promise recorded for this file comes from the describe step, not the listing."""
        entry = self.by_path.get(remote.path)
        recorded = _source_promise(entry) if entry else None
        return recorded is not None and all(p.field != recorded.field for p in remote.promises)

    def check_promises(self, files: list[RemoteFile]) -> None:
        """Exit 4 before downloading if the source's promise for a file differs from the one locked."""
        locked = self.by_path
        problems = [problem for f in files if f.path in locked for problem in _promise_problems(locked[f.path], f)]
        if problems:
            raise self.mismatch(problems)

    def check_manifest(self, entries: list[ManifestEntry]) -> None:
        want = {(f.path, f.size, f.sha256) for f in self.files}
        have = {(f.path, f.size, f.sha256) for f in entries}
        if want != have:
            problems = [f"{p}: not as locked" for p, _, _ in sorted(want ^ have)]
            raise self.mismatch(sorted(set(problems)))

    def mismatch(self, problems: list[str]) -> IntegrityError:
        return IntegrityError(f"{self.source} revision {self.revision} no longer matches --lockfile {self.origin}: "
                              + "; ".join(problems[:8]) + " — regenerate the lockfile or restore the source")


def _source_promise(entry: ManifestEntry) -> Promise | None:
    """The promise a locked file was verified by at lock time, where it came from the source."""
    promise = entry.evidence.promise if entry.evidence else None
    return promise if promise is not None and promise.origin == "source" else None


def _promise_problems(entry: ManifestEntry, remote: RemoteFile, missing_ok: bool = False) -> list[str]:
    """How the source's current promise for a file differs from the one recorded in the lockfile."""
    recorded = _source_promise(entry)
    if recorded is None:
        return []
    current = next((p for p in remote.promises if p.field == recorded.field), None)
    if current is None:
        return [] if missing_ok else [f"{entry.path}: the source no longer promises {recorded.field}"]
    if not current.same_claim(recorded):
        return [f"{entry.path}: the source's {recorded.field} is {current.shown}, the lockfile has {recorded.shown}"]
    return []


def _signature(body: object) -> dict[str, str] | None:
    if body is None:
        return None
    if not isinstance(body, dict) or not SHA256.match(str(body.get("sha256", ""))):
        raise ValueError("bad signature entry")
    return {key: str(value) for key, value in body.items()}
