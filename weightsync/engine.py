"""The sync engine: plan, fetch, verify, publish.

    warm check ──> resolve (network) ──> lock ──> plan ──> fetch+verify ──> publish
        │                                  │        │
        └ pinned & published: no request   │        └ staged (resume) / reused (hardlink) / download
                                           └ someone else published meanwhile: warm

Internal logic of `Engine.sync`:
1. Refuse what needs no request: an unusable --dest, a --name that would change meaning (`_check_binding`).
2. Warm check: a pinned (or --offline) revision whose manifest and sizes match is served as it is.
3. Resolve: `source.snapshot()` lists the files and the immutable revision; an unreachable source falls back,
   loudly, to the last revision published for that ref.
4. Lock the revision, then check again: another pod may have published it while this one waited.
5. Plan: reuse (hardlink) what other revisions hold, `describe` the rest where the source can, check the
   lockfile and --require-checksum, then `fetch.plan_fetch` (staged, resumed, fresh; space needed).
6. Fetch and verify: `fetch.Fetcher.run(plan)`; every byte is checked against its promise as it lands.
7. Signature: under a --trust-* policy, model-signing checks the verified staging tree (`_check_signature`).
8. Publish: manifest, read-only files, fsync, one rename, then `current` (`_publish`).

The engine knows nothing about a particular backend (sources/), the on-disk
layout (layout.py), locking (locking.py) or how bytes move (fetch.py); it decides
what has to happen and in which order so that MODEL_DIR only ever shows a
complete, verified revision. docs/architecture.md draws the whole picture.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from weightsync import config, testhooks
from weightsync.checksums import HEX, Evidence, Verified, describe_tally, feed_file, tally
from weightsync.config import AddressingStyle, Layout, LockMode, RevisionKey, TransferConfig, VerifyMode
from weightsync.errors import DiskSpaceError, IntegrityError, NetworkError, SourceError, UsageError, WeightsyncError
from weightsync.fsutil import fsync_dir, fsync_tree, is_regular_file_of_size, make_read_only, write_atomic
from weightsync.hfcache import HubCache, repo_folder
from weightsync.layout import HUB_CACHE_VOLUME, LOCKS, MANIFESTS, REVISIONS, ModelVolume, check_listing, safe_makedirs
from weightsync.logs import counted, event, human_bytes, human_duration, named
from weightsync.manifest import Manifest, ManifestEntry, ManifestError
from weightsync.sources import RemoteFile, Selection, Snapshot, Source, open_source

if TYPE_CHECKING:  # what only a request that asks for it, or a sync that takes the network, loads
    from weightsync.lockfile import Lockfile
    from weightsync.locking import Held
    from weightsync.retry import RetryPolicy
    from weightsync.signature import SignaturePolicy, SignatureRecord

log = logging.getLogger("weightsync")


@dataclass(frozen=True)
class SyncRequest:
    """What to sync, where, and how strictly; how the bytes move is `transfer` (config.py)."""

    source: str
    dest: Path
    fallbacks: tuple[str, ...] = ()  # tried in order when `source` is unreachable or lacks the revision
    name: str | None = None
    layout: Layout = "native"
    repo_id: str | None = None  # hf-cache: the cache entry's repo id (an hf:// source has its own)
    revision: str | None = None
    selection: Selection = field(default_factory=Selection)
    verify: VerifyMode = "fast"
    lock_timeout: float | None = None
    offline: bool = False
    addressing_style: AddressingStyle = "auto"
    lockfile: Lockfile | None = None
    lock_mode: LockMode = "auto"
    require_checksum: bool = False
    rebind: bool = False
    signature: SignaturePolicy | None = None
    transfer: TransferConfig = field(default_factory=lambda: config.DEFAULTS)


@dataclass
class SyncResult:
    """What a sync published (or found published: `warm`), and what it took; `summary` says it in one line."""

    path: Path
    name: str
    revision: str
    source: str  # where this revision's bytes came from: the primary or one of its fallbacks
    source_revision: str
    files: int
    total_bytes: int
    bytes_fetched: int = 0
    bytes_reused: int = 0
    bytes_resumed: int = 0
    seconds: float = 0.0
    lock_wait_seconds: float = 0.0
    retries: int = 0
    warm: bool = False

    checked: str = ""
    paths: tuple[str, ...] = ()  # the revision's files (its manifest's), for the checks before exec
    file_evidence: tuple[Evidence | None, ...] = ()  # per file, None where an older manifest did not record it
    signature: SignatureRecord | None = None
    signature_checked_now: bool = False  # warm: the signature was checked by this run, not when it was published
    cache_snapshot: Path | None = None  # --layout hf-cache: the snapshot directory servers load
    primary: str = ""  # the --source asked for, when --fallback sources were given ("" without them)
    skipped: tuple[tuple[str, str], ...] = ()  # (source, why) for each source this run fell through

    @property
    def from_fallback(self) -> bool:
        """Whether the revision came from a --fallback source rather than the primary --source."""
        return bool(self.primary) and self.source != self.primary

    @property
    def model_dir(self) -> Path:
        """What servers load (MODEL_DIR, the last stdout line): the hub cache's snapshot, or the revision."""
        return self.cache_snapshot or self.path

    @cached_property
    def evidence(self) -> dict[str, int]:
        """Files per evidence, tallied once (the summary, the `published` event and the termination message show
        it)."""
        return tally(self.file_evidence)

    @property
    def evidence_kinds(self) -> dict[str, int]:
        """Files by the bounded evidence kind (`crc32-composite`, `size-only`, ...): the metrics label."""
        return tally(self.file_evidence, by_kind=True)

    @property
    def verification(self) -> str:
        """What every file was verified by, e.g. `2 files crc64nvme (source), 1 file md5 (source)`, strongest
        first: the signature over all of them, when one was required."""
        signed = f"signature {self.signature.file} by {self.signature.signer}; " if self.signature else ""
        return signed + describe_tally(self.evidence)

    def summary(self) -> str:
        rate = self.bytes_fetched / self.seconds if self.seconds > 0 else 0.0
        if self.warm:
            signed = ""
            if self.signature is not None:
                when = "now, against the files re-hashed" if self.signature_checked_now else "when published"
                signed = f"; signature {self.signature.file} by {self.signature.signer} checked {when}"
            return (f"already published (warm start) {self.source} revision {self.revision}{self._fallback_note()}: "
                    f"{counted(self.files, 'file')}, "
                    f"{human_bytes(self.total_bytes)}, checked ({self.checked}) in "
                    f"{human_duration(self.seconds)}; nothing downloaded; verified when published: "
                    f"{describe_tally(self.evidence)}{signed}")
        return (f"published {self.source} revision {self.revision}{self._fallback_note()}: "
                f"{counted(self.files, 'file')}, "
                f"{human_bytes(self.total_bytes)}; fetched {human_bytes(self.bytes_fetched)}, "
                f"reused {human_bytes(self.bytes_reused)}, resumed {human_bytes(self.bytes_resumed)} "
                f"in {human_duration(self.seconds)} (average {human_bytes(rate)}/s); verified: {self.verification}"
                + (f"; in the Hugging Face cache as {self.cache_snapshot}" if self.cache_snapshot else ""))

    def _fallback_note(self) -> str:
        return f" (fallback for {self.primary})" if self.from_fallback else ""

    def fields(self) -> dict[str, object]:
        """The summary as data, for JSON logs, the termination message and metrics."""
        return {"source": self.source, "name": self.name, "revision": self.revision, "path": str(self.path),
                **({"model_dir": str(self.cache_snapshot)} if self.cache_snapshot else {}),
                "files": self.files, "bytes_total": self.total_bytes, "bytes_fetched": self.bytes_fetched,
                "bytes_reused": self.bytes_reused, "bytes_resumed": self.bytes_resumed,
                "seconds": round(self.seconds, 3), "lock_wait_seconds": round(self.lock_wait_seconds, 3),
                "retries": self.retries, "warm": self.warm, "verification": self.verification,
                "evidence": self.evidence, **({"checked": self.checked} if self.warm else {}),
                **({"signature": self.signature.to_json()} if self.signature else {}),
                **({"primary": self.primary, "from_fallback": self.from_fallback,
                    "skipped_sources": [{"source": uri, "reason": why} for uri, why in self.skipped]}
                   if self.primary else {})}


def default_name(source: Source, selection: Selection) -> str:
    """The model's directory when --name is not given: the source's, plus the filter set's id when filtered,
    so a filtered sync gets a directory of its own instead of changing what the full model's `current` is."""
    variant = selection.key()
    return f"{source.default_name}--{variant}" if variant else source.default_name


def revision_key(revision: str, selection: Selection) -> RevisionKey:
    """The directory name of a revision: filtered syncs of one revision must not share a directory."""
    variant = selection.key()
    return f"{revision}-{variant}" if variant else revision


def _ref_key(ref: str, selection: Selection) -> str:
    variant = selection.key()
    return f"{ref}@{variant}" if variant else ref


FALLS_THROUGH = (NetworkError, SourceError, IntegrityError)
"""What makes a sync try its next --fallback source: the source is unreachable after its retries (or asks to
wait longer than a source with another behind it is waited for), lacks or denies the repo / prefix / revision,
or served a listing or bytes that failed verification (nothing unverified is ever published, so another
source's verified copy is safe). A UsageError (this request is wrong everywhere) and the volume's own failures
(disk space, locks) never do: another source cannot cure them."""


class _SourceFailed(Exception):
    """One source's attempt failed with a fall-through error, at `stage`: resolve (listing), plan (signature,
    lockfile, pin) or download (fetch, verify, signature check)."""

    def __init__(self, stage: str, error: WeightsyncError) -> None:
        super().__init__(str(error))
        self.stage, self.error = stage, error


class Engine:
    """Runs one request against one volume, from its source or, in order, its fallbacks."""

    def __init__(self, request: SyncRequest, source: Source | None = None,
                 sources: Sequence[Source] | None = None) -> None:
        self.request = request
        if sources is None:
            opened = [source or self._open(request.source)]
            sources = [*opened, *(self._open(uri) for uri in request.fallbacks)]
        self.sources: tuple[Source, ...] = tuple(sources)
        self.primary = self.sources[0]
        # The source this run takes its snapshot (and so every byte) from: the primary until `_sync` moves on to
        # a fallback. Set once per attempt, never changed while an attempt runs: one revision, one source.
        self.source = self.primary
        self.skipped: list[tuple[str, str]] = []
        self.hub_cache = self._hub_cache() if request.layout == "hf-cache" else None
        if self.hub_cache is not None:
            # weightsync's own volume lives inside the repo's folder, where huggingface_hub looks at nothing
            self.volume = ModelVolume(self.hub_cache.repo, HUB_CACHE_VOLUME, label=self.hub_cache.folder)
        else:
            self.volume = ModelVolume(request.dest.absolute(),
                                      request.name or default_name(self.primary, request.selection))
        self.started = time.monotonic()
        self.damaged: dict[str, set[str]] = {}  # revision -> paths that failed the warm check (repaired, not reused)
        self._manifests: dict[str, Manifest] = {}
        self._signatures: dict[str, SignatureRecord] = {}  # revision -> the signature this run accepted it under

    def _open(self, uri: str) -> Source:
        request = self.request
        return open_source(uri, request.transfer, addressing_style=request.addressing_style, offline=request.offline,
                           lockfile=request.lockfile)

    @cached_property
    def base_retry(self) -> RetryPolicy:
        """One progress clock for every request of this sync; made at the first request (a warm start makes
        none, and so never loads retry.py)."""
        from weightsync.retry import RetryPolicy

        return RetryPolicy.of(self.request.transfer)

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy for the source in use. The last source honours a Retry-After as a lone source does
        (retry.py's cap, within the watchdog): waiting is all that is left. One with a fallback behind it is not
        waited for beyond `retry_max` seconds (the cap of its own backoff): a mirror that says "come back in a
        minute" while the origin answers now would only delay the start. The policies share one progress clock."""
        if self.source is self.sources[-1]:
            return self.base_retry
        return replace(self.base_retry, retry_after_limit=self.base_retry.max_delay)

    # -- public entry points ---------------------------------------------------
    def sync(self) -> SyncResult:
        result = self._sync()
        if self.hub_cache is not None:
            result = self._into_hub_cache(result)
        event("published", "%s", result.summary(), **result.fields())
        return result

    # -- the Hugging Face cache layout (hfcache.py) --------------------------------
    def _hub_cache(self) -> HubCache:
        request, source = self.request, self._hub_source() or self.primary
        if request.name:
            raise UsageError("--name does not apply to --layout hf-cache: the cache entry is named by the repo id "
                             "(--repo-id, or the hf:// source's)")
        repo_id, repo_type = request.repo_id, "model"
        if source.kind == "hf":
            repo_id = repo_id or getattr(source, "repo_id", None)
            repo_type = getattr(source, "repo_type", "model")
        if not repo_id:
            raise UsageError(f"--layout hf-cache needs --repo-id OWNER/NAME for {source.uri}: the name servers will "
                             "load it by (vllm serve OWNER/NAME)")
        return HubCache(self.request.dest.absolute(), repo_folder(repo_id, repo_type))

    def _cache_ref(self) -> str | None:
        """The ref to point at the commit: the branch or tag asked for (none for a commit, as huggingface_hub
        does); `main` for a source without refs, whose every sync is its latest."""
        hub = self._hub_source()
        if hub is None:
            return "main"
        wanted = self.request.revision or hub.default_ref
        return None if hub.pinned_revision(self.request.revision) else wanted

    def _hub_source(self) -> Source | None:
        """The first hf:// source among the primary and its fallbacks: it names the hub cache entry and its ref
        (an s3:// mirror of the repo, first, serves the same commit)."""
        return next((source for source in self.sources if source.kind == "hf"), None)

    def _into_hub_cache(self, result: SyncResult) -> SyncResult:
        """Project the published revision into the hub cache (blobs, snapshot, ref), unless it already is."""
        from weightsync.hfcache import CachedFile

        assert self.hub_cache is not None
        manifest = self._manifest(result.revision)
        commit, ref = result.source_revision, self._cache_ref()
        if not self.hub_cache.is_published(commit, ref, [(entry.path, entry.size) for entry in manifest.files]):
            directory = self.volume.revision_dir(result.revision)
            from_hub = manifest.source.startswith("hf://")
            files = [CachedFile(entry.path, entry.size, self._blob_name(entry, from_hub), directory / entry.path)
                     for entry in manifest.files]
            self.hub_cache.publish(commit, ref, files)
        return replace(result, cache_snapshot=self.hub_cache.snapshot_dir(commit))

    @staticmethod
    def _blob_name(entry: ManifestEntry, from_hub: bool) -> str:
        """huggingface_hub's name for the blob: the Hub's etag (LFS sha256 or git blob sha1), else the sha256."""
        etag = (entry.etag or "").lower()
        if from_hub and len(etag) in (40, 64) and HEX.fullmatch(etag):
            return etag
        return entry.sha256

    def _sync(self) -> SyncResult:
        request, primary, volume = self.request, self.primary, self.volume
        volume.check_dest()  # what can be refused without a request comes first, before any log line
        self._check_binding()
        pinned = self._pinned()
        fallbacks = [source.uri for source in self.sources[1:]]
        event("start", "sync %s%s%s into %s", primary.uri, f" revision {request.revision}" if request.revision else "",
              f" (fallback {', '.join(fallbacks)})" if fallbacks else "", volume.root, source=primary.uri,
              revision=request.revision, dest=str(volume.root), offline=request.offline, verify=request.verify,
              **({"fallbacks": fallbacks} if fallbacks else {}))
        known = revision_key(pinned, request.selection) if pinned else None
        if request.offline and not known:
            known = self._offline_revision()
        if known:
            manifest = self.published(known)
            if manifest is not None:
                return self._finish_warm(manifest, known, ref=None, source_revision=pinned or known)
            if request.offline:
                have = ", ".join(volume.revisions()) or "none"
                raise SourceError(f"--offline: revision {known} of {volume.label} is not complete on {volume.root} "
                                  f"(published revisions: {have}); run once with network access")

        # Each source in turn, from its own snapshot to a published revision: an attempt that fails with a
        # fall-through error, while resolving or mid-download, leaves nothing published and the next source
        # starts its plan from scratch (see `_attempt` for why its staging never splices two sources' bytes).
        failures: list[tuple[Source, _SourceFailed]] = []
        for index, source in enumerate(self.sources):
            self.source = source
            try:
                return self._attempt(pinned)
            except _SourceFailed as failed:
                failures.append((source, failed))
                if index + 1 < len(self.sources):
                    self._fall_through(source, failed, self.sources[index + 1])
        self.source = primary
        if any(failed.stage == "resolve" and isinstance(failed.error, NetworkError) for _, failed in failures):
            return self._last_published_instead(failures, pinned)
        raise self._every_source_failed(failures)

    def _pinned(self) -> str | None:
        """The revision id --revision pins (no request needed), by the first source that can name it.

        A source that cannot name it at all (an S3 prefix given a Hub commit) cannot hold it: `_attempt` skips
        it. Only when no source can is the request wrong (the primary's UsageError, exit 2).
        """
        refusals: list[UsageError] = []
        for source in self.sources:
            try:
                pinned = source.pinned_revision(self.request.revision)
            except UsageError as exc:
                refusals.append(exc)
                continue
            if pinned:
                return pinned
        if len(refusals) == len(self.sources):
            raise refusals[0]
        return None

    def _names_no_revision(self, source: Source) -> bool:
        """Whether `source` refuses --revision as no revision of its kind (so it cannot hold it)."""
        try:
            source.pinned_revision(self.request.revision)
        except UsageError:
            return True
        return False

    def _attempt(self, pinned: str | None) -> SyncResult:
        """Resolve, plan, fetch and publish from `self.source` alone; a fall-through error is `_SourceFailed`.

        Never mixing two sources: the snapshot is this source's, and so is every file the plan downloads. What
        an earlier attempt left in staging is only ever reused under this snapshot's own promises: a staging
        directory belongs to one revision id, so two sources share one only when they report the same revision
        (a weightsync mirror and its origin: the same content); a part file is resumed only for the same
        (path, size, ETag) (resume.py), which another source's object does not have unless it is that object;
        and a finished staged file is kept only once it verifies against this source's promise
        (fetch._recheck_staged). Reused (hardlinked) files match this snapshot's sha256 or identity, as always.
        """
        request, volume, source = self.request, self.volume, self.source
        if len(self.sources) > 1 and self._names_no_revision(source):
            raise _SourceFailed("resolve", SourceError(f"{source.uri} cannot hold revision {request.revision} (not "
                                                       "a revision id or ref of this kind of source)"))
        try:
            snapshot = self._resolve(request.revision)
        except FALLS_THROUGH as exc:
            raise _SourceFailed("resolve", exc) from exc
        try:
            snapshot = self._with_signature(snapshot)
            if request.lockfile:
                snapshot = replace(snapshot, files=request.lockfile.check_listing(snapshot.files))
            if pinned and snapshot.revision != pinned:
                self._refuse_unknown_pin(pinned, snapshot.revision)
        except FALLS_THROUGH as exc:
            raise _SourceFailed("plan", exc) from exc
        key = revision_key(snapshot.revision, request.selection)
        ref = self._ref_of(snapshot, pinned)
        manifest = self.published(key)
        if manifest is not None:
            return self._finish_warm(manifest, key, ref=ref, source_revision=snapshot.revision)

        from weightsync.locking import volume_lock

        volume.ensure(LOCKS)
        with volume_lock(volume.lock_path(key), request.lock_timeout, f"{volume.label} revision {key}",
                         mode=request.lock_mode, lease_timeout=request.transfer.lease_timeout) as held:
            testhooks.pause("locked")
            manifest = self.published(key)
            if manifest is not None:
                result = self._finish_warm(manifest, key, ref=ref, source_revision=snapshot.revision)
            else:
                try:
                    result = self._download_and_publish(snapshot, key, held, ref)
                except FALLS_THROUGH as exc:
                    raise _SourceFailed("download", exc) from exc
            result.lock_wait_seconds = held.waited
        return result

    def _ref_of(self, snapshot: Snapshot, pinned: str | None) -> str | None:
        """The ref to record the revision under: the snapshot's, or, from a fallback without refs (an s3://
        mirror of an hf:// primary), the primary's wanted ref, so --offline and an unreachable start find the
        newest revision of `main` whichever source published it."""
        if snapshot.ref or pinned or self.source is self.primary or not self.primary.features.refs:
            return snapshot.ref
        return self.request.revision or self.primary.default_ref

    def _fall_through(self, source: Source, failed: _SourceFailed, following: Source) -> None:
        """One event per source given up on: which, why, at which stage, and which source is tried next."""
        error = failed.error
        loud = isinstance(error, IntegrityError)  # a source that served bad bytes or an unsafe listing
        reason = f"{type(error).__name__} (exit {error.exit_code}): {error}"
        self.skipped.append((source.uri, str(error)))
        event("source_fallback", "%s failed %s (%s); trying the next source, %s%s", source.uri,
              "while " + {"resolve": "resolving", "plan": "planning", "download": "downloading"}[failed.stage],
              reason, following.uri,
              "; nothing it served was published: every byte is verified before it is" if loud else "",
              level=logging.ERROR if loud else logging.WARNING, source=source.uri, next_source=following.uri,
              stage=failed.stage, reason=str(error), exit_code=error.exit_code, error_kind=type(error).__name__)

    def _every_source_failed(self, failures: list[tuple[Source, _SourceFailed]]) -> WeightsyncError:
        """The one error when no source could be used: what each said. Exit 7 if any was unreachable (a rerun
        may succeed once it is back), else the code every source agreed on, else the primary's."""
        if len(failures) == 1:
            return failures[0][1].error
        errors = [failed.error for _, failed in failures]
        kinds = {type(error) for error in errors}
        if len(kinds) == 1:
            kind: type[WeightsyncError] = kinds.pop()
        elif any(isinstance(error, NetworkError) for error in errors):
            kind = NetworkError
        else:
            kind = type(errors[0])
        said = "; ".join(f"[{source.uri}] {failed.error}" for source, failed in failures)
        return kind(f"no source could be used ({counted(len(failures), 'source')} tried, in order): {said}")

    def _check_binding(self) -> None:
        """One name, one meaning: refuse a sync that would point `current` at another source or filter set.

        Pods read DEST/<name>/current; a filtered sync (`--include '*.json'`) or a different source under the
        same name would silently hand them another model. The name's meaning is what its `current` revision's
        manifest records; --rebind switches it on purpose.
        """
        volume, request = self.volume, self.request
        current = volume.current_revision()
        if current is None or request.rebind:
            return
        try:
            serving = self._manifest(current)
        except ManifestError:
            return  # nothing trustworthy to compare with: the sync will re-verify or replace it
        wanted = request.selection
        recorded = Selection(include=tuple(serving.selection.get("include", ())),
                             exclude=tuple(serving.selection.get("exclude", ())))
        bound, asked = serving.bound_to, [source.uri for source in self.sources]
        # With --fallback the name is bound to the set of sources its sync declared to be one model. A sync keeps
        # the meaning when its own sources share one with that set: a fallback added, removed or swapped in
        # first, a mirror put in front of the origin it mirrors (`--source s3://mirror --fallback <origin>`).
        # Sources that share none are another model, however many there are: --rebind.
        if recorded == wanted and not set(asked).isdisjoint(bound):
            return
        serves = serving.source + (f" (bound to {', '.join(bound)})" if serving.sources else "")
        raise UsageError(
            f"{volume.root} serves {serves}{_describe_filters(recorded)}, and this sync asks for "
            f"{', '.join(asked)}{_describe_filters(wanted)}: syncing it under the same name would change what "
            f"{volume.current} means for every pod that reads it. Give it its own --name, or pass --rebind "
            f"(WEIGHTSYNC_REBIND=1) to switch {volume.label} over on purpose")

    def _refuse_unknown_pin(self, pinned: str, listed: str) -> None:
        """The source lists another revision than the pinned one: changed since, or never this source's."""
        key = revision_key(pinned, self.request.selection)
        known = (self.request.lockfile is not None or os.path.lexists(self.volume.manifest_path(key))
                 or os.path.lexists(self.volume.staging_dir(key)))
        if known:
            raise IntegrityError(f"{self.source.uri} no longer matches the pinned revision {pinned} (it is now "
                                 f"{listed}): the source changed since it was pinned; pin the new revision or "
                                 "restore the source")
        raise SourceError(f"--revision {pinned} is not what {self.source.uri} holds (it lists revision {listed} "
                          f"now), and {pinned} was never synced onto {self.volume.root}: a mistyped id, or a source "
                          "that changed since the id was printed; drop --revision to take what it holds now")

    def source_revision_of(self, key: RevisionKey) -> str:
        """The source's revision id behind a revision directory name (which may carry the filter set's id)."""
        variant = self.request.selection.key()
        return key.removesuffix(f"-{variant}") if variant else key

    def verify(self, revision: str | None) -> tuple[Path, list[str], Manifest | None]:
        """Re-hash a published revision against its manifest, and re-check its signature under the request's
        policy; return (dir, problems, manifest)."""
        key = self._revision_for_verify(revision)
        directory = self.volume.revision_dir(key)
        try:
            manifest = Manifest.load(self.volume.manifest_path(key))
        except ManifestError as exc:
            return directory, [f"manifest: {exc}"], None
        problems = describe_problems(check_files(directory, manifest, full=True))
        if not problems and self.request.signature is not None:
            try:
                self.request.signature.check(directory, {e.path: e.sha256 for e in manifest.files}, "signature",
                                             self._filtered_out, outcome="the revision is left as it is")
            except IntegrityError as exc:
                problems.append(str(exc))
        if not problems:
            mark_verified(self.volume, key)
        return directory, problems, manifest

    # -- warm path ---------------------------------------------------------------
    def _manifest(self, key: RevisionKey) -> Manifest:
        """A revision's manifest, parsed once per run (the binding check and the warm check read the same one;
        a published manifest never changes, a repair writes it only after both)."""
        if key not in self._manifests:
            self._manifests[key] = Manifest.load(self.volume.manifest_path(key))
        return self._manifests[key]

    def published(self, key: RevisionKey) -> Manifest | None:
        """The manifest if revision `key` is published and intact (sizes, or hashes with --verify full)."""
        directory = self.volume.revision_dir(key)
        if not self.volume.is_real_revision(key):  # no symlink anywhere on the way: never hand out a path outside
            return None
        try:
            manifest = self._manifest(key)
        except ManifestError as exc:
            log.warning("revision %s is on the volume but its manifest is unusable (%s); re-verifying", key, exc)
            return None
        if self.request.require_checksum:
            self._refuse_size_only(manifest, key)
        full = self.request.verify == "full"
        problems = check_files(directory, manifest, full=full)
        if self.request.lockfile and not problems:
            self.request.lockfile.check_manifest(manifest.files)
        if full and not problems:
            mark_verified(self.volume, key)
        if problems:
            listed = "; ".join(describe_problems(problems)[:5])
            if self.request.offline:
                raise IntegrityError(f"{directory} is damaged and --offline forbids repairing it: {listed}")
            if key not in self.damaged:  # checked again under the lock: say it once
                log.warning("revision %s on the volume is damaged (%s); repairing: the damaged files are fetched "
                            "again, the intact ones kept", key, listed)
            self.damaged[key] = set(problems)
            return None
        if not self._check_published_signature(manifest, directory, key):
            return None
        return manifest

    def _check_published_signature(self, manifest: Manifest, directory: Path, key: RevisionKey) -> bool:
        """A warm start under a signature policy: a revision published under the same policy was checked then;
        any other is re-hashed now (its files may have changed since) and its signature checked against those
        digests, on the volume and with no request. A damaged file means a repair (False); a signature that
        fails refuses the start (exit 4), leaving the revision and `current` as they are."""
        policy = self.request.signature
        if policy is None or key in self._signatures:
            return True
        recorded = manifest.signature
        same_bundle = policy.in_model or (recorded is not None and recorded.file == policy.signature)
        if recorded is not None and recorded.policy == policy.id and same_bundle:
            self._signatures[key] = recorded
            return True
        log.warning("revision %s was published %s; re-hashing it to check its signature now", key,
                    f"under another policy ({recorded.policy})" if recorded else "without a signature check")
        if self.request.verify != "full":  # --verify full has just hashed every file
            problems = check_files(directory, manifest, full=True)
            if problems:
                log.warning("revision %s on the volume is damaged (%s); repairing", key,
                            "; ".join(describe_problems(problems)[:5]))
                self.damaged[key] = set(problems)
                return False
        self._signatures[key] = policy.check(directory, {e.path: e.sha256 for e in manifest.files},
                                             f"published revision {directory}", self._filtered_out,
                                             outcome="not started; the revision and current are left as they are")
        return True

    def _refuse_size_only(self, manifest: Manifest, key: RevisionKey) -> None:
        """--require-checksum on a revision published without it: refuse, and leave it as it is (pods may be
        serving it; deleting it is the operator's call)."""
        unchecked = [e.path for e in manifest.files if e.evidence is None or e.evidence.promise is None]
        if unchecked:
            raise IntegrityError(
                f"--require-checksum: revision {key} on {self.volume.root} has {named(unchecked)} checked by size "
                "only when it was published (or by a weightsync too old to record it); remove "
                f"{self.volume.revision_dir(key)} to sync it again, or drop --require-checksum")

    def _finish_warm(self, manifest: Manifest, key: RevisionKey, ref: str | None, source_revision: str) -> SyncResult:
        self._point_current(key, ref)
        how = "sha256 of every file against the manifest" if self.request.verify == "full" else "manifest and sizes"
        return SyncResult(path=self.volume.revision_dir(key), name=self.volume.label, revision=key,
                          source=manifest.source, source_revision=source_revision, files=len(manifest.files),
                          **self._fallback_fields(),
                          total_bytes=manifest.total_bytes, seconds=time.monotonic() - self.started, warm=True,
                          checked=how, paths=tuple(entry.path for entry in manifest.files),
                          file_evidence=tuple(entry.evidence for entry in manifest.files),
                          signature=self._signatures.get(key, manifest.signature),
                          signature_checked_now=self._signatures.get(key) not in (None, manifest.signature))

    def _point_current(self, key: RevisionKey, ref: str | None) -> None:
        """Flip `current` and record the ref; on a read-only volume leave both as they are."""
        try:
            self.volume.point_current_at(key)
            if ref:
                self.volume.record_ref(_ref_key(ref, self.request.selection), key)
        except (WeightsyncError, OSError) as exc:
            log.debug("not updating %s: %s", self.volume.current, exc)

    def _last_published_instead(self, failures: list[tuple[Source, _SourceFailed]], pinned: str | None
                                ) -> SyncResult:
        """No source could be used and one was unreachable: serve what the last sync of this ref published
        (from whichever source), loudly, or fail with what every source said."""
        unreachable = self._every_source_failed(failures)
        if pinned or self.request.lockfile:
            raise unreachable
        try:
            known = self._offline_revision()
        except SourceError:
            raise unreachable from None
        manifest = self.published(known) if known else None
        if manifest is None or known is None:
            raise unreachable
        uris = ", ".join(source.uri for source, _ in failures)
        event("source_unreachable", "%s %s unreachable (%s); starting with the last published revision %s",
              uris, "is" if len(failures) == 1 else "are", unreachable, known, level=logging.WARNING,
              revision=known, error=str(unreachable), **({"sources": uris.split(", ")} if len(failures) > 1 else {}))
        return self._finish_warm(manifest, known, ref=None, source_revision=known)

    def _offline_revision(self) -> str | None:
        """The revision the last sync of this ref published (the primary's ref: fallbacks record theirs under
        it, `_ref_of`), else `current`; no request."""
        ref = self.request.revision or self.primary.default_ref
        if ref:
            found = self.volume.read_ref(_ref_key(ref, self.request.selection))
            if found:
                return found
            raise SourceError(f"--offline: {self.primary.uri} revision {ref} was never synced onto "
                              f"{self.volume.root}; run once with network access, or pin a revision that is "
                              "on the volume")
        current = self.volume.current_revision()
        variant = self.request.selection.key()
        if current and (not variant or current.endswith(f"-{variant}")):
            return current
        raise SourceError(f"--offline: nothing published for {self.primary.uri}"
                          f"{' revision ' + ref if ref else ''} on {self.volume.root}; "
                          "run once with network access, or pin a revision that is on the volume")

    def _revision_for_verify(self, revision: str | None) -> str:
        pinned = self.source.pinned_revision(revision) if revision else None
        if pinned:
            return revision_key(pinned, self.request.selection)
        found = self.volume.read_ref(_ref_key(revision, self.request.selection)) if revision else None
        found = found or self.volume.current_revision()
        if not found:
            raise SourceError(f"nothing published for {self.source.uri} under {self.volume.root}; "
                              "sync it first (or pass --name / --revision)")
        return found

    # -- cold path ---------------------------------------------------------------
    def _resolve(self, revision: str | None) -> Snapshot:
        from weightsync.retry import call_with_retries

        snapshot = call_with_retries(f"listing {self.source.uri}",
                                     lambda: self.source.snapshot(revision, self.request.selection),
                                     self.retry)
        check_listing([f.path for f in snapshot.files], self.source.uri)
        return snapshot

    def _with_signature(self, snapshot: Snapshot) -> Snapshot:
        """Under `--signature auto` the model.sig next to the model is synced even where --include / --exclude
        leave it out (it is not part of the model's meaning: the directory name and binding keep the filters);
        without one, exit 4 before any byte moves."""
        policy = self.request.signature
        if policy is None or policy.in_model is None or any(f.path == policy.in_model for f in snapshot.files):
            return snapshot
        if self.request.selection.key():
            from weightsync.retry import call_with_retries

            pinned = snapshot.revision if self.source.features.refs else None  # the same commit, not a moved ref
            try:
                found = call_with_retries(f"listing {policy.in_model} at {self.source.uri}",
                                          lambda: self.source.snapshot(pinned, Selection(include=(policy.in_model,))),
                                          self.retry)
            except SourceError:
                found = None
            if found is not None:
                return replace(snapshot, files=(*snapshot.files, *found.files))
        raise policy.describe_missing(self.source.uri)

    def _offer_intact_files(self, reuse: ReuseIndex, key: RevisionKey) -> None:
        """Repair: the files of a damaged revision that passed the warm check are kept, not fetched again."""
        damaged = self.damaged.get(key)
        if damaged is None or not self.volume.is_real_revision(key):
            return
        try:
            manifest = Manifest.load(self.volume.manifest_path(key))
        except ManifestError:
            return
        reuse.add(self.volume.revision_dir(key), [e for e in manifest.files if e.path not in damaged],
                  hashed=self.request.verify == "full")

    def _set_aside(self, key: RevisionKey) -> Path | None:
        """Move a damaged or manifest-less revision out of the way of its repaired tree, into `.trash`."""
        self.volume.ensure(REVISIONS)  # refuses a planted symlink: never move or delete anything outside DEST
        directory = self.volume.revision_dir(key)
        if not os.path.lexists(directory):
            return None
        trash = self.volume.trash_path(f"{key}.{int(time.time())}.{os.getpid()}")
        os.rename(directory, trash)
        return trash

    def _fallback_fields(self) -> dict[str, object]:
        """SyncResult's primary and skipped sources, when --fallback sources were given."""
        if len(self.sources) == 1:
            return {}
        return {"primary": self.primary.uri, "skipped": tuple(self.skipped)}

    def _download_and_publish(self, snapshot: Snapshot, key: RevisionKey, held: Held, ref: str | None
                              ) -> SyncResult:
        """Plan (reuse, describe, staged, resume), fetch and verify what is missing, then publish."""
        from weightsync.fetch import Fetcher, plan_fetch, report_verified
        from weightsync.progress import Progress

        request, volume = self.request, self.volume
        staging, parts, tree = volume.make_staging(key)
        verified: dict[str, Verified] = {}
        pending: list[RemoteFile] = []
        reused = 0
        reuse = ReuseIndex.build(volume, exclude=key)
        self._offer_intact_files(reuse, key)
        if self.hub_cache is not None:
            for remote in snapshot.files:  # what huggingface_hub already downloaded, hashed before it is kept
                promised = remote.sha256_promise
                if promised and is_regular_file_of_size(self.hub_cache.blob(promised.value), remote.size):
                    reuse.add_unverified(self.hub_cache.blob(promised.value), promised.value, remote.size)
        for remote in snapshot.files:
            found = reuse.link_into(remote, tree, full=request.verify == "full")
            if found is None:
                pending.append(remote)
                continue
            verified[remote.path] = found
            reused += remote.size
            report_verified(remote.path, remote.size, found, how="reused")

        described = self._describe(pending)
        self._check_promises(described, verified)
        transfer = request.transfer
        plan = plan_fetch(described, parts, tree, transfer, took_over=held.took_over)
        verified.update(plan.staged)
        self._check_free_space(staging, plan.space_needed)

        total = sum(f.size for f in snapshot.files)
        requests = sum(f.metadata_requests for f in described)
        event("plan", "syncing %s revision %s: %s, %s (%s to download, %s resumed, %s reused; %s) into %s",
              self.source.uri, key, counted(len(snapshot.files), "file"), human_bytes(total),
              human_bytes(plan.bytes_to_download), human_bytes(plan.bytes_resumed), human_bytes(reused),
              counted(requests, "metadata request"), volume.root, revision=key,
              files=len(snapshot.files), bytes_total=total, bytes_to_download=plan.bytes_to_download,
              bytes_resumed=plan.bytes_resumed, bytes_reused=reused, metadata_requests=requests)
        with Progress(plan.bytes_to_download, len(plan.downloads), interval=transfer.progress_interval) as progress:
            fetcher = Fetcher(self.source, progress, transfer, self.retry, cancelled=held.lost)
            try:
                verified.update(fetcher.run(plan))
            except (WeightsyncError, OSError):
                held.check()  # a lost lease stopped the download: say that, not what it caused
                raise

        signature = self._check_signature(tree, {f.path: verified[f.path].sha256 for f in snapshot.files}, key)
        manifest = Manifest(source=self.source.uri, revision=key, ref=ref,
                            sources=[source.uri for source in self.sources] if len(self.sources) > 1 else [],
                            selection={"include": list(request.selection.include),
                                       "exclude": list(request.selection.exclude)},
                            files=[ManifestEntry(path=f.path, size=f.size, sha256=verified[f.path].sha256, etag=f.etag,
                                                 evidence=verified[f.path].evidence) for f in snapshot.files],
                            signature=signature)
        self._publish(manifest, staging, key, ref, held)
        return SyncResult(path=volume.revision_dir(key), name=volume.label, revision=key, source=self.source.uri,
                          **self._fallback_fields(),
                          source_revision=snapshot.revision, files=len(snapshot.files), total_bytes=total,
                          bytes_fetched=progress.bytes_done,
                          bytes_reused=reused, bytes_resumed=plan.bytes_resumed,
                          seconds=time.monotonic() - self.started,
                          retries=fetcher.retries, paths=tuple(entry.path for entry in manifest.files),
                          file_evidence=tuple(entry.evidence for entry in manifest.files),
                          signature=signature)

    def _check_signature(self, tree: Path, digests: dict[str, str], key: RevisionKey) -> SignatureRecord | None:
        """The signature check between verify and publish (signature.py); and a lockfile's pinned bundle."""
        policy = self.request.signature
        if policy is None:
            return None
        record = policy.check(tree, digests, f"{self.source.uri} revision {key}", self._filtered_out)
        pinned = self.request.lockfile.signature if self.request.lockfile else None
        if pinned and pinned.get("sha256") != record.sha256:
            raise IntegrityError(f"the signature {record.file} differs from the one --lockfile "
                                 f"{self.request.lockfile.origin} pinned (sha256 {record.sha256}, pinned "
                                 f"{pinned.get('sha256')}); nothing was published", path=record.file)
        trusted = "" if record.policy == record.signer else f" (policy {record.policy})"
        event("signature_verified", "signature %s verified: signed by %s%s", record.file, record.signer, trusted,
              **record.to_json())
        return record

    def _filtered_out(self, path: str) -> bool:
        """Whether --include / --exclude leave `path` out of this sync on purpose (a signed file may be)."""
        return not self.request.selection.matches(path)

    def _describe(self, files: list[RemoteFile]) -> list[RemoteFile]:
        """Ask the source for the promises the listing lacks, a few files at a time.

        `thorough` where the listing's promise is not enough for the request: --require-checksum wants
        every promise the source can give, and a lockfile's recorded promise must be compared with the
        source's current one.
        """
        lockfile = self.request.lockfile
        if not self.source.features.describes:
            return files
        from weightsync.retry import call_with_retries

        def describe(remote: RemoteFile) -> RemoteFile:
            thorough = self.request.require_checksum or bool(lockfile and lockfile.needs_describe(remote))
            return call_with_retries(f"describing {remote.path}", lambda: self.source.describe(remote, thorough),
                                     self.retry)

        if len(files) <= 1:
            return [describe(f) for f in files]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.request.transfer.concurrency, len(files))) as pool:
            return list(pool.map(describe, files))

    def _check_promises(self, described: list[RemoteFile], verified: dict[str, Verified]) -> None:
        """Before any byte moves: the lockfile's recorded promises, and --require-checksum."""
        if self.request.lockfile:
            self.request.lockfile.check_promises(described)
        if not self.request.require_checksum:
            return
        unverifiable = [(f.path, f.evidence.reason) for f in described if f.evidence.promise is None]
        unverifiable += [(path, v.evidence.reason) for path, v in verified.items() if v.evidence.promise is None]
        if unverifiable:
            paths, reason = [path for path, _ in unverifiable], unverifiable[0][1]
            raise IntegrityError(
                f"--require-checksum: {named(paths)} has no checksum to verify it by ({reason}); nothing was "
                "downloaded — upload it with a checksum (aws s3 cp --checksum-algorithm CRC64NVME, or boto3's "
                "default CRC32), pin it with a lockfile (`weightsync lock`), or drop --require-checksum")

    @staticmethod
    def _check_free_space(staging: Path, needed: int) -> None:
        import shutil

        free = shutil.disk_usage(staging).free
        if needed > free:
            raise DiskSpaceError(f"not enough space on {staging.parent.parent.parent}: need "
                                 f"{human_bytes(needed)} ({needed} bytes) more, {human_bytes(free)} ({free} bytes) "
                                 "free; grow the volume or remove old revisions")

    def _publish(self, manifest: Manifest, staging: Path, key: RevisionKey, ref: str | None, held: Held) -> None:
        """Manifest first, then one rename of the verified tree; `current` flips last.

        The lock is checked again first: a process whose lease was taken over while it was frozen must not
        publish over the new holder's work.
        """
        volume = self.volume
        testhooks.pause("before-publish")
        held.check()
        try:
            volume.ensure(MANIFESTS)
            write_atomic(volume.manifest_path(key), manifest.to_json())
            testhooks.pause("manifest-written")
            tree = staging / "tree"
            make_read_only(tree)
            if self.request.transfer.fsync:
                fsync_tree(tree)
            revisions = volume.ensure(REVISIONS)
            held.check()
            aside = self._set_aside(key)
            os.rename(tree, volume.revision_dir(key))
            if self.request.transfer.fsync:
                fsync_dir(revisions)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskSpaceError(f"the volume filled up while publishing {key}: {exc.strerror}; nothing was "
                                     "published and the verified files stay in staging — free space and rerun"
                                     ) from exc
            raise
        import shutil

        testhooks.pause("renamed")
        self._point_current(key, ref)
        mark_verified(volume, key)
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def mark_verified(volume: ModelVolume, key: RevisionKey) -> None:
    """Record when every byte of a revision was last hashed (shown by `weightsync status`)."""
    try:
        write_atomic(volume.verified_path(key), f"{time.time():.3f}\n".encode(), durable=False)
    except OSError as exc:
        log.debug("not recording the verification time: %s", exc.strerror)


def _describe_filters(selection: Selection) -> str:
    import shlex

    flags = selection.flags()
    return f" with {shlex.join(flags)}" if flags else " (every file)"






def check_files(directory: Path, manifest: Manifest, full: bool) -> dict[str, str]:
    """Compare a revision directory with its manifest (sizes always, sha256 when `full`): damaged path -> why.

    Each file is looked up relative to one O_PATH descriptor of `directory`, so the kernel resolves only the
    file's own path, not DEST's again for every file (a warm start checks every file of the model).
    """
    problems: dict[str, str] = {}
    try:
        directory_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return {entry.path: "missing" for entry in manifest.files}
    try:
        for entry in manifest.files:
            try:
                info = os.lstat(entry.path, dir_fd=directory_fd)
            except OSError:
                problems[entry.path] = "missing"
                continue
            if not stat.S_ISREG(info.st_mode):
                problems[entry.path] = "not a regular file"
            elif info.st_size != entry.size:
                problems[entry.path] = f"size {info.st_size}, expected {entry.size}"
            elif full and hash_file(directory / entry.path) != entry.sha256:
                problems[entry.path] = "sha256 mismatch"
    finally:
        os.close(directory_fd)
    return problems


def describe_problems(problems: dict[str, str]) -> list[str]:
    return [f"{path}: {why}" for path, why in problems.items()]


def hash_file(path: Path) -> str:
    import hashlib  # OpenSSL's, ~4 ms to load: only --verify full, verify and reuse hash

    digest = hashlib.sha256()
    feed_file(path, digest.update)
    return digest.hexdigest()








class ReuseIndex:
    """Files of other published revisions of the same model, to hardlink instead of download."""

    def __init__(self) -> None:
        self.by_sha256: dict[tuple[str, int], Path] = {}
        self.by_identity: dict[tuple[str, int, str], tuple[Path, ManifestEntry]] = {}
        self.hashed: set[Path] = set()  # files whose sha256 this run already checked: never hashed twice
        self.unverified: set[Path] = set()  # files another tool wrote (huggingface_hub's blobs): always hashed

    @classmethod
    def build(cls, volume: ModelVolume, exclude: str) -> ReuseIndex:
        index = cls()
        for revision in volume.revisions():
            if revision == exclude:
                continue
            try:
                manifest = Manifest.load(volume.manifest_path(revision))
            except ManifestError:
                continue
            index.add(volume.revision_dir(revision), manifest.files)
        return index

    def add(self, directory: Path, entries: Iterable[ManifestEntry], hashed: bool = False) -> None:
        for entry in entries:
            self.by_sha256[(entry.sha256, entry.size)] = directory / entry.path
            if hashed:
                self.hashed.add(directory / entry.path)
            if entry.etag and entry.evidence is not None:
                self.by_identity[(entry.path, entry.size, entry.etag)] = (directory / entry.path, entry)

    def add_unverified(self, path: Path, sha256: str, size: int) -> None:
        """A file named by a sha256 that nothing of ours checked: reused only once it hashes to it."""
        if (sha256, size) not in self.by_sha256:
            self.by_sha256[(sha256, size)] = path
            self.unverified.add(path)

    def link_into(self, remote: RemoteFile, tree: Path, full: bool) -> Verified | None:
        """Hardlink a matching published file into the staging tree; return what it is verified by.

        A file is reused only under the promise it would be downloaded against: the sha256 the source (or
        a lockfile) promises, matched by the sha256 computed when it was published; or, for the same
        object at the source (path, size, ETag), the evidence it was verified by then.
        """
        candidate: tuple[Path, Verified] | None = None
        promised = remote.sha256_promise
        if promised and (promised.value, remote.size) in self.by_sha256:
            candidate = (self.by_sha256[(promised.value, remote.size)], Verified(promised.value, Evidence(promised)))
        elif remote.etag and (remote.path, remote.size, remote.etag) in self.by_identity:
            path, entry = self.by_identity[(remote.path, remote.size, remote.etag)]
            assert entry.evidence is not None
            candidate = (path, Verified(entry.sha256, entry.evidence))
        if candidate is None:
            return None
        source_path, verified = candidate
        try:
            info = os.lstat(source_path)
            if not stat.S_ISREG(info.st_mode) or info.st_size != remote.size:
                return None
            if full and source_path not in self.hashed and hash_file(source_path) != verified.sha256:
                return None
            parent, _, name = remote.path.rpartition("/")
            target = (safe_makedirs(tree, parent) if parent else tree) / name
            target.unlink(missing_ok=True)
            try:
                os.link(source_path, target)
            except OSError:
                import shutil

                shutil.copyfile(source_path, target, follow_symlinks=False)
            if source_path in self.unverified and hash_file(target) != verified.sha256:
                target.unlink()  # hashed after the link, so what is kept is what was hashed
                return None
        except OSError:
            return None
        log.debug("reused %s from %s", remote.path, source_path)
        return verified
