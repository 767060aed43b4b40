"""`weightsync mirror`: fetch a model once per cluster into an S3 (or S3-compatible) store that pods sync from.

    snapshot + describe (the origin) ──> per file: HEAD (already there?) ──> ranged reads ──> Verifier ──> PutObject
                                                                                                 └───> UploadPart…
    ──> every file verified and written ──> PutObject <prefix>/weightsync.lock (the commit point) ──> deletions

Why streaming, not staging: a Job's emptyDir rarely holds a 140 GB model, so bytes go from the origin's ranged
reads straight into UploadPart, one part of memory per file in flight (`--concurrency` × `--part-size`). Every
byte is fed, in order, to the same `checksums.Verifier` a sync uses, against the origin's own promise (the Hub's
LFS sha256 or git blob id, S3's CRC64NVME or ETag, GCS's CRC32C). A multipart upload is completed only after
the verifier accepted the whole file; a small file is PutObject only once it is verified. So an object whose
bytes failed their check never exists, and the lockfile object, written last, names only verified objects.

Each object carries what lets the in-cluster store vouch for it in turn: a full-object CRC64NVME (multipart:
`x-amz-checksum-type: FULL_OBJECT`, each part's CRC64NVME and the whole object's at Complete; single PUTs:
`x-amz-checksum-sha256`) that the server itself checks on write, and `x-amz-meta-sha256` (set at the start where
the sha256 is known then: a promised or previously mirrored sha256, any file small enough to be one PUT; else by an
in-place CopyObject once the upload completed).
The S3 source (sources/s3.py) reads the lockfile object: the revision a pod syncs is the origin's, every file
carries the lockfile's sha256, and a mirror that is incomplete or was changed is exit 4.

Resume: after every part, a small state object under `<prefix>/.weightsync/uploads/` records the upload id and
the parts (size, ETag, CRC64NVME), and nothing of the verifier (hashlib's state cannot be saved, and a hash
state read back from a bucket would seed the very check it should pass). A rerun after a SIGKILL finds the
upload (ListMultipartUploads), checks the recorded parts are there (ListParts) and reads from the origin only
what is missing. The parts of an upload in progress cannot be read (GetObject's partNumber needs a completed
object), so the resumed upload is completed with the CRC64NVME combined from its parts, then read back from
the target once, whole, through the same `Verifier` against the origin's promise, before its state object is
deleted and its lockfile entry exists; a mismatch deletes the object (exit 4). An upload a killed run completed
but did not clear the state of is verified the same way, in place. A file with no origin promise
starts again from byte 0: there is nothing to verify the bytes it did not read against.

Idempotence: an object whose size and x-amz-meta-sha256 already match the sha256 the origin (or the previous
lockfile, for the same content) gives is skipped without reading a byte of it from the origin, unless its resume
state is still there (a resumed object carries that metadata from the start, and is verified only after Complete).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from weightsync import testhooks
from weightsync.checksums import Evidence, Promise, Verifier, describe_tally, tally
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.layout import check_listing
from weightsync.logs import counted, event, human_bytes, human_duration
from weightsync.manifest import ManifestEntry
from weightsync.sources import RemoteFile, Selection, Snapshot, Source, open_source
from weightsync.sources.s3 import THROTTLED, S3ErrorMapper

if TYPE_CHECKING:
    from weightsync.lockfile import Lockfile
    from weightsync.retry import RetryPolicy
    from weightsync.sources.s3api import S3Api, UploadedPart

log = logging.getLogger("weightsync")
LOCKFILE = "weightsync.lock"  # sources/s3.py's MIRROR_LOCKFILE
STATE = ".weightsync"  # sources/s3.py's MIRROR_STATE
MARKER = f"{STATE}/mirroring"  # a run in progress: its origin, revision and the files to delete after its commit
MAX_PARTS = 10_000  # S3's limit: a bigger file gets bigger parts


@dataclass(frozen=True)
class MirrorRequest:
    """What to mirror where; `to_endpoint` sends the target's requests to another S3 endpoint than the
    environment's (an s3:// source on AWS mirrored into an in-cluster SeaweedFS or MinIO)."""

    source: str
    to: str
    revision: str | None = None
    selection: Selection = field(default_factory=Selection)
    addressing_style: str = "auto"
    to_endpoint: str | None = None
    transfer: TransferConfig = DEFAULTS


@dataclass
class MirrorResult:
    """What one mirror run did: `summary` says it in one line."""

    source: str
    target: str
    revision: str
    files: int
    total_bytes: int
    uploaded_files: int = 0
    uploaded_bytes: int = 0
    skipped_files: int = 0
    skipped_bytes: int = 0
    resumed_bytes: int = 0
    read_bytes: int = 0
    read_back_bytes: int = 0
    deleted: tuple[str, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    """What each file uploaded by this run was verified by; a skipped file was verified when it was mirrored."""
    seconds: float = 0.0

    def summary(self) -> str:
        deleted = f", deleted {counted(len(self.deleted), 'file')} the revision no longer has" if self.deleted else ""
        resumed = f" ({human_bytes(self.resumed_bytes)} of it resumed, {human_bytes(self.read_back_bytes)} read " \
            "back from the target to verify it)" if self.resumed_bytes else ""
        return (f"mirrored {self.source} revision {self.revision} to {self.target}: {counted(self.files, 'file')}, "
                f"{human_bytes(self.total_bytes)}; uploaded {counted(self.uploaded_files, 'file')} "
                f"({human_bytes(self.uploaded_bytes)}{resumed}), skipped {counted(self.skipped_files, 'file')} "
                f"already mirrored ({human_bytes(self.skipped_bytes)}); read {human_bytes(self.read_bytes)} from the "
                f"source{deleted} in {human_duration(self.seconds)}; {self.verification()}")

    def verification(self) -> str:
        """What this run checked: the uploaded files against the source; skipped ones were checked before."""
        if not self.evidence:
            return "nothing uploaded, so nothing verified now (each file was verified when it was mirrored)"
        return f"verified against the source: {describe_tally(tally(self.evidence))}"

    def fields(self) -> dict[str, object]:
        return {"source": self.source, "target": self.target, "revision": self.revision, "files": self.files,
                "bytes_total": self.total_bytes, "uploaded_files": self.uploaded_files,
                "bytes_uploaded": self.uploaded_bytes, "skipped_files": self.skipped_files,
                "bytes_skipped": self.skipped_bytes, "bytes_resumed": self.resumed_bytes,
                "bytes_read": self.read_bytes, "bytes_read_back": self.read_back_bytes, "deleted": list(self.deleted),
                "verification": self.verification(), "seconds": round(self.seconds, 3)}


def parse_target(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of `--to s3://bucket/prefix`."""
    if not uri.startswith("s3://"):
        raise UsageError(f"--to {uri!r} must be an s3://bucket/prefix URI (an S3 or S3-compatible store)")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise UsageError(f"--to {uri!r} has no bucket; use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _known_sha256(remote: RemoteFile, previous: Lockfile | None, same_revision: bool) -> tuple[str | None,
                                                                                             Evidence | None]:
    """The file's sha256 before reading it, and the evidence it was mirrored by: the origin's sha256 promise, or
    the previous lockfile's entry for the same content (the same revision, or the same origin promise)."""
    entry = previous.by_path.get(remote.path) if previous else None
    if entry is not None and entry.size == remote.size:
        recorded = entry.evidence.promise if entry.evidence else None
        same_claim = recorded is not None and any(p.same_claim(recorded) for p in remote.promises)
        if same_revision or same_claim:
            return entry.sha256, entry.evidence
    promised = remote.sha256_promise
    return (promised.value, None) if promised else (None, None)


class Mirror:
    """One mirror run: the origin (a Source), the target (S3Api, bucket, prefix) and the retry policy."""

    def __init__(self, request: MirrorRequest, source: Source | None = None) -> None:
        self.request = request
        self.bucket, self.prefix = parse_target(request.to)
        self.target = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.source = source or open_source(request.source, request.transfer,
                                            addressing_style=request.addressing_style)
        if self.source.uri.rstrip("/") == self.target and not request.to_endpoint:
            raise UsageError(f"--to {request.to} is the source itself; mirror into another bucket or prefix")
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._resumed = 0
        self._read_back = 0
        self._unfinished: set[str] = set()
        self._total = 0
        self._last_progress = time.monotonic()
        self._cancelled = threading.Event()

    # -- the target ------------------------------------------------------------
    @cached_property
    def api(self) -> S3Api:
        """The target's S3 calls: the AWS environment's settings and credentials, `--to-endpoint` if given (first
        used by the main thread, before any worker starts)."""
        from weightsync.sources.s3api import S3Api, S3Settings

        settings = S3Settings.from_environment(self.request.addressing_style)
        if self.request.to_endpoint:
            settings = replace(settings, endpoint=self.request.to_endpoint.rstrip("/"), custom_endpoint=True)
        transfer = self.request.transfer
        return S3Api(settings, transfer.connect_timeout, transfer.stall_timeout, transfer.concurrency + 4)

    def key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def _write(self, what: str, call: Any) -> Any:
        """One request to the target, mapped to exit codes and retried like every request of a sync."""
        from weightsync.retry import call_with_retries

        def attempt() -> Any:
            with _TargetErrors(f"{what} {self.target}"):
                return call()

        return call_with_retries(f"{what} {self.target}", attempt, self.retry)

    @cached_property
    def retry(self) -> RetryPolicy:
        """One retry policy and progress clock for every request of the run, the origin's and the target's."""
        from weightsync.retry import RetryPolicy

        return RetryPolicy.of(self.request.transfer)

    def _head(self, path: str) -> dict[str, str] | None:
        from weightsync.sources.s3api import S3Error

        def head() -> dict[str, str] | None:
            try:
                return self.api.head_object(self.bucket, self.key(path))
            except S3Error as exc:
                if exc.status == 404 and exc.code in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._write("checking", head)

    def _previous_lockfile(self) -> Lockfile | None:
        """The lockfile a previous mirror committed here, if any (a damaged one counts as none)."""
        from weightsync.lockfile import Lockfile
        from weightsync.sources.s3api import S3Error

        def get() -> bytes | None:
            try:
                return self.api.get_small_object(self.bucket, self.key(LOCKFILE))
            except S3Error as exc:
                if exc.status == 404 and exc.code != "NoSuchBucket":
                    return None
                raise

        text = self._write("reading the lockfile of", get)
        if text is None:
            return None
        try:
            return Lockfile.parse(text.decode(), f"{self.target}/{LOCKFILE}")
        except (ValueError, KeyError, TypeError, IntegrityError) as exc:
            log.warning("the lockfile at %s/%s is unreadable (%s); mirroring as if there were none", self.target,
                        LOCKFILE, exc)
            return None

    # -- the run -----------------------------------------------------------------
    def run(self) -> MirrorResult:
        request, source = self.request, self.source
        event("mirror_start", "mirror %s%s to %s", source.uri,
              f" revision {request.revision}" if request.revision else "", self.target, source=source.uri,
              target=self.target, revision=request.revision)
        snapshot = self._resolve()
        previous = self._previous_lockfile()
        same_revision = bool(previous and previous.source == source.uri and previous.revision == snapshot.revision)
        files = self._describe(list(snapshot.files))
        total = self._total = sum(f.size for f in files)
        plan = [(f, *_known_sha256(f, previous, same_revision)) for f in files]
        dropped = self._pending_deletions() | (set(previous.by_path) if previous else set())
        self._unfinished = {listed.key for listed in self._write("listing the resume state at", lambda: list(
            self.api.list_objects(self.bucket, self.key(f"{STATE}/uploads/"))))}
        self._write("marking the mirror in progress at", lambda: self.api.put_object(
            self.bucket, self.key(MARKER), *_json_object({"source": source.uri, "revision": snapshot.revision,
                                                         "previous_paths": sorted(dropped)}), {}))
        outcomes = self._mirror_files(plan)
        entries = [entry for entry, _ in outcomes]
        from weightsync.lockfile import Lockfile

        lockfile = Lockfile(source=source.uri, revision=snapshot.revision, files=tuple(entries),
                            include=request.selection.include, exclude=request.selection.exclude)
        self._write("committing the lockfile of", lambda: self.api.put_object(
            self.bucket, self.key(LOCKFILE), *_text_object(lockfile.to_json()), {}))
        event("mirror_committed", "committed %s/%s: revision %s, %s", self.target, LOCKFILE, snapshot.revision,
              counted(len(entries), "file"), revision=snapshot.revision)
        testhooks.pause("mirror-committed")
        deleted = self._delete_removed(dropped, lockfile)
        self._clear_state()
        uploaded = [entry for entry, did in outcomes if did]
        return MirrorResult(source=source.uri, target=self.target, revision=snapshot.revision, files=len(entries),
                            total_bytes=total, uploaded_files=len(uploaded),
                            uploaded_bytes=sum(e.size for e in uploaded),
                            skipped_files=len(entries) - len(uploaded),
                            skipped_bytes=total - sum(e.size for e in uploaded), resumed_bytes=self._resumed,
                            read_bytes=self._bytes_read, read_back_bytes=self._read_back, deleted=deleted,
                            evidence=tuple(e.evidence or Evidence(None, "unrecorded") for e in uploaded),
                            seconds=time.monotonic() - self.started)

    def _mirror_files(self, plan: list[tuple[RemoteFile, str | None, Evidence | None]]
                      ) -> list[tuple[ManifestEntry, bool]]:
        """Every file, `--concurrency` at a time; the first failure (or SIGTERM, Ctrl-C) stops the others at their
        next part, so the error comes out now and not after every other file finished."""
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        pool = ThreadPoolExecutor(max_workers=max(1, min(self.request.transfer.concurrency, len(plan))))
        try:
            futures = [pool.submit(self._mirror_file, *item) for item in plan]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [future.exception() for future in futures if future.done() and not future.cancelled()
                      and future.exception() is not None]
            if failed:
                raise failed[0]  # the first to fail: the others are stopped only after this
            return [future.result() for future in futures]
        finally:
            self._cancelled.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _resolve(self) -> Snapshot:
        from weightsync.retry import call_with_retries

        request = self.request
        pinned = self.source.pinned_revision(request.revision)
        snapshot = call_with_retries(f"listing {self.source.uri}",
                                     lambda: self.source.snapshot(request.revision, request.selection), self.retry)
        if pinned and snapshot.revision != pinned:
            raise SourceError(f"--revision {pinned} is not what {self.source.uri} holds (it lists revision "
                              f"{snapshot.revision} now); drop --revision to mirror what it holds now")
        check_listing([f.path for f in snapshot.files], self.source.uri)
        clash = [f.path for f in snapshot.files if f.path == LOCKFILE or f.path.startswith(f"{STATE}/")]
        if clash:
            raise UsageError(f"{self.source.uri} holds {clash[0]}, a name the mirror keeps for itself; exclude it "
                             f"(--exclude {clash[0]})")
        return snapshot

    def _describe(self, files: list[RemoteFile]) -> list[RemoteFile]:
        if not self.source.features.describes or not files:
            return files
        from concurrent.futures import ThreadPoolExecutor

        from weightsync.retry import call_with_retries

        def describe(remote: RemoteFile) -> RemoteFile:
            return call_with_retries(f"describing {remote.path}", lambda: self.source.describe(remote), self.retry)

        with ThreadPoolExecutor(max_workers=max(1, min(self.request.transfer.concurrency, len(files)))) as pool:
            return list(pool.map(describe, files))

    # -- one file ------------------------------------------------------------------
    def _mirror_file(self, remote: RemoteFile, sha256: str | None,
                     evidence: Evidence | None) -> tuple[ManifestEntry, bool]:
        """Skip a file the target already holds (same size and x-amz-meta-sha256), else upload it verified;
        (its lockfile entry, whether it was uploaded). Never skipped while its resume state is there: a resumed
        upload carries its x-amz-meta-sha256 from the start, and is verified only after Complete."""
        if sha256 is not None and self._state_key(remote.path) not in self._unfinished:
            head = self._head(remote.path)
            from weightsync.sources.s3api import content_length, user_metadata

            if head is not None and content_length(head) == remote.size and \
                    user_metadata(head).get("sha256", "").lower() == sha256:
                log.info("%s: already mirrored (size and x-amz-meta-sha256 match), skipped", remote.path)
                return ManifestEntry(remote.path, remote.size, sha256, evidence=evidence or remote.evidence), False
        for _ in range(2):  # a second time only when a reply voided the promise being checked
            try:
                if remote.size <= self._part_size(remote.size):
                    return self._put_small(remote), True
                return self._put_multipart(remote, sha256), True
            except _Voided as voided:
                remote = voided.remote
                if self.source.features.describes:  # learn every other promise the source can give (a HEAD)
                    from weightsync.retry import call_with_retries

                    remote = call_with_retries(f"describing {remote.path}",
                                               lambda r=remote: self.source.describe(r, True), self.retry)
        raise IntegrityError(f"{remote.path}: every promise the source made for it was voided while reading it")

    def _part_size(self, size: int) -> int:
        part = self.request.transfer.part_size
        return max(part, -(-size // MAX_PARTS))

    def _read(self, remote: RemoteFile, start: int, end: int, verifier: Verifier | None) -> bytearray:
        """Bytes [start, end) of the file from the origin, retried as a whole (a range read half-way is read
        again, so the verifier is fed each byte once, in order). No verifier: a resumed upload's remaining
        parts, checked after Complete by reading the whole object back (`_verify_completed`)."""
        from weightsync.retry import call_with_retries

        if self._cancelled.is_set():
            raise _Cancelled()
        buffer = bytearray(end - start)

        def read() -> dict[str, str]:
            view, got = memoryview(buffer), 0
            reader = self.source.open_range(remote, start, end)
            try:
                while got < len(buffer):
                    count = reader.readinto(view[got:])
                    if count == 0:
                        break
                    got += count
                    self.retry.clock.tick()
            finally:
                reader.close()
            if got != len(buffer):
                raise TransientError(f"reading {remote.path}: the source sent {got} of {len(buffer)} bytes of "
                                     f"{start}-{end - 1}")
            return reader.voids

        voids = call_with_retries(f"reading {remote.path} from {self.source.uri}", read, self.retry) \
            if end > start else {}
        chosen = remote.evidence.promise
        if chosen is not None and chosen.field in voids:
            promises = tuple(p.void(voids[p.field]) if p.field in voids else p for p in remote.promises)
            raise _Voided(remote.with_promises(promises))
        with self._lock:
            self._bytes_read += len(buffer)
            self._progress()
        if verifier is not None:
            verifier.update(buffer)
        return buffer

    def _progress(self) -> None:
        """A progress line every --progress-interval seconds while bytes move (a 140 GB mirror takes a while)."""
        interval, now = self.request.transfer.progress_interval, time.monotonic()
        if interval and now - self._last_progress >= interval:
            self._last_progress = now
            event("mirror_progress", "mirroring: %s read from the source and verified (%s resumed), %s in all",
                  human_bytes(self._bytes_read), human_bytes(self._resumed), human_bytes(self._total),
                  bytes_read=self._bytes_read, bytes_resumed=self._resumed, bytes_total=self._total)

    def _put_small(self, remote: RemoteFile) -> ManifestEntry:
        verifier = Verifier(remote.path, remote.size, remote.evidence)
        data = self._read(remote, 0, remote.size, verifier)
        sha256 = verifier.finish()
        self._write(f"uploading {remote.path} to", lambda: self.api.put_object(
            self.bucket, self.key(remote.path), data, sha256, {"sha256": sha256}))
        log.info("%s: uploaded (%s, verified by %s)", remote.path, human_bytes(remote.size), remote.evidence.label)
        return ManifestEntry(remote.path, remote.size, sha256, evidence=remote.evidence)

    def _put_multipart(self, remote: RemoteFile, sha256: str | None) -> ManifestEntry:
        """Ranged reads into UploadPart, verified as they stream; Complete only once the whole file is. A resumed
        upload has no verifier state for the parts a killed run sent, so its whole object is verified by reading
        it back from the target after Complete, before its lockfile entry exists."""
        from awscrt.checksums import crc64nvme

        api, key, part_size = self.api, self.key(remote.path), self._part_size(remote.size)
        identity, state_key = _identity(remote), self._state_key(remote.path)
        upload_id, parts, completed = self._resume(remote, key, state_key, identity, part_size)
        if completed:  # killed after its Complete, before its state was cleared: verify the object where it is
            return self._finish_upload(remote, key, sha256, parts, None, state_key)
        verifier = None if parts else Verifier(remote.path, remote.size, remote.evidence)
        if upload_id is None:
            metadata = {"sha256": sha256} if sha256 else {}
            upload_id = self._write(f"starting the upload of {remote.path} to",
                                    lambda: api.create_multipart_upload(self.bucket, key, metadata))
        offset = sum(p.size for p in parts)
        try:
            while offset < remote.size:
                end = min(remote.size, offset + part_size)
                data = self._read(remote, offset, end, verifier)
                number = len(parts) + 1
                part_crc = crc64nvme(data, 0)
                uploaded = self._write(f"uploading part {number} of {remote.path} to",
                                       lambda n=number, d=data, c=part_crc: api.upload_part(
                                           self.bucket, key, upload_id, n, d, f"{c:016x}"))
                parts.append(uploaded)
                offset = end
                self._save_state(state_key, identity, upload_id, part_size, parts)
            sha256_now = verifier.finish() if verifier is not None else None
        except IntegrityError:
            self._abandon(key, upload_id, state_key)
            raise
        crc = _combined_crc64nvme(parts)
        self._write(f"completing the upload of {remote.path} to",
                    lambda: self._complete(remote, key, upload_id, parts, crc, state_key))
        testhooks.pause("mirror-upload-completed")
        return self._finish_upload(remote, key, sha256, parts, sha256_now, state_key)

    def _finish_upload(self, remote: RemoteFile, key: str, sha256: str | None, parts: list[UploadedPart],
                       verified: str | None, state_key: str) -> ManifestEntry:
        """A completed upload's lockfile entry: `verified` is its sha256 when every byte was checked as it
        streamed; else (resumed) the object is read back and checked first. Its resume state goes last, so a
        rerun skips the file only once it was verified."""
        crc = _combined_crc64nvme(parts)
        sha256_now = verified or self._verify_completed(remote, key, crc, state_key)
        if sha256 is None:
            self._add_sha256(remote, key, sha256_now, crc)
        self._write("clearing the resume state at", lambda: self.api.delete_object(self.bucket, state_key))
        log.info("%s: uploaded in %s (%s, verified by %s)", remote.path, counted(len(parts), "part"),
                 human_bytes(remote.size), remote.evidence.label)
        return ManifestEntry(remote.path, remote.size, sha256_now, evidence=remote.evidence)

    def _verify_completed(self, remote: RemoteFile, key: str, crc: int, state_key: str) -> str:
        """The sha256 of a completed resumed upload, read back from the target and checked against the origin's
        promise (and against the CRC64NVME the store accepted at Complete); on a mismatch the object is deleted
        and IntegrityError raised. Why this is sound: the parts a killed run uploaded were never checked against
        the promise, and nothing saved about them (the state object, anyone with write access to the bucket can
        change) is trusted; the object's own bytes are what is verified, with the same `Verifier` as a stream
        from the origin, before the file is skipped by a rerun (its state object stays until then) or named in a
        lockfile. The target is in the cluster: reading it back is what resume trades for the origin's egress."""
        from awscrt.checksums import crc64nvme

        from weightsync.retry import call_with_retries

        verifier, stored, part_size = Verifier(remote.path, remote.size, remote.evidence), 0, self._part_size(
            remote.size)
        for start in range(0, remote.size, part_size):
            end = min(remote.size, start + part_size)
            buffer = bytearray(end - start)

            def read(start: int = start, buffer: bytearray = buffer) -> None:
                with _TargetErrors(f"reading {remote.path} back from {self.target}"):
                    body, view, got = self.api.get_object(self.bucket, key, start, start + len(buffer)), \
                        memoryview(buffer), 0
                    try:
                        while got < len(buffer) and (count := body.readinto(view[got:])):
                            got += count
                            self.retry.clock.tick()
                    finally:
                        body.close()
                if got != len(buffer):
                    raise TransientError(f"reading {remote.path} back from {self.target}: {got} of {len(buffer)} "
                                         f"bytes of {start}-{start + len(buffer) - 1}")

            call_with_retries(f"reading {remote.path} back from {self.target}", read, self.retry)
            verifier.update(buffer)
            stored = crc64nvme(buffer, stored)
            with self._lock:
                self._read_back += len(buffer)
        try:
            sha256 = verifier.finish()
            if stored != crc:
                raise IntegrityError(f"{self.target}/{remote.path} read back does not give the CRC64NVME the store "
                                     "accepted at Complete", path=remote.path)
        except IntegrityError as exc:
            self._discard(key, state_key)
            raise IntegrityError(f"{exc} (the resumed upload, read back from the target; the object was deleted "
                                 "and nothing was committed — rerun weightsync mirror)", path=remote.path) from exc
        log.info("%s: the resumed upload read back from the target matches %s", remote.path, remote.evidence.label)
        return sha256

    def _discard(self, key: str, state_key: str) -> None:
        """Delete a completed object that failed its check after Complete, and its resume state."""
        for what in (key, state_key):
            self._write("deleting an unverified object at", lambda k=what: self.api.delete_object(self.bucket, k))

    def _complete(self, remote: RemoteFile, key: str, upload_id: str, parts: list[UploadedPart], crc: int,
                  state_key: str) -> None:
        """CompleteMultipartUpload with the CRC64NVME of the verified bytes; the server refuses it (BadDigest) if
        the parts it holds do not combine to that: then nothing of the upload is kept, and a rerun starts over."""
        from weightsync.sources.s3api import S3Error

        try:
            self.api.complete_multipart_upload(self.bucket, key, upload_id, parts, f"{crc:016x}")
        except S3Error as exc:
            if exc.code == "NoSuchUpload" and self._completed(key, remote.size, crc):
                return  # a retry of a Complete whose reply was lost: the object is there, as verified
            if exc.code != "BadDigest":
                raise
            self._abandon(key, upload_id, state_key)
            raise IntegrityError(f"{self.target}: the parts the store holds for {remote.path} do not add up to the "
                                 "CRC64NVME of the bytes verified against the source (BadDigest); the upload was "
                                 "aborted and nothing was committed — rerun weightsync mirror",
                                 path=remote.path) from exc

    def _add_sha256(self, remote: RemoteFile, key: str, sha256: str, crc: int) -> None:
        """Give an object whose sha256 was unknown when its upload started (an origin that promises none) its
        `x-amz-meta-sha256`, by an in-place copy; then check the copy is still the verified bytes (size and
        CRC64NVME). Past CopyObject's 5 GiB the lockfile alone records the sha256."""
        from weightsync.sources.s3api import S3Error

        try:
            self._write(f"recording the sha256 of {remote.path} at",
                        lambda: self.api.replace_metadata(self.bucket, key, {"sha256": sha256}))
        except SourceError as exc:
            if remote.size <= 5 << 30:
                raise
            log.info("%s: over CopyObject's 5 GiB, so its sha256 is in the lockfile only (%s)", remote.path, exc)
            return
        try:
            intact = self._completed(key, remote.size, crc)
        except S3Error as exc:
            raise SourceError(f"checking {self.target}/{remote.path} after recording its sha256: {exc}") from exc
        if not intact:
            raise IntegrityError(f"{self.target}/{remote.path} is not the verified bytes after its metadata copy "
                                 "(size or CRC64NVME differ); nothing was committed — rerun weightsync mirror",
                                 path=remote.path)

    def _completed(self, key: str, size: int, crc: int) -> bool:
        return _holds(self.api.head_object(self.bucket, key), size, crc)

    def _state_key(self, path: str) -> str:
        return self.key(f"{STATE}/uploads/{hashlib.sha256(path.encode()).hexdigest()[:32]}.json")

    def _resume(self, remote: RemoteFile, key: str, state_key: str, identity: str, part_size: int
                ) -> tuple[str | None, list[UploadedPart], bool]:
        """(upload id, parts, completed) of an upload a killed run left that can be continued, or that it
        completed but did not get to verify; else (None, [], False), having aborted what cannot. Only a file
        with an origin promise resumes: its object is verified against that promise once complete; a size-only
        file has nothing to check the parts it did not read against. Nothing in the state is trusted: it only
        says where to continue."""
        from weightsync.sources.s3api import S3Error, UploadedPart

        try:
            text = self._write("reading the resume state of", lambda: self.api.get_small_object(self.bucket,
                                                                                                 state_key))
            state = json.loads(text)
            parts = [UploadedPart(int(p["number"]), int(p["size"]), str(p["etag"]), str(p["crc64nvme"]))
                     for p in state.get("parts", [])]
            upload_id = str(state.get("upload_id", ""))
        except SourceError:
            return None, [], False  # no state: nothing to resume
        except (ValueError, S3Error, KeyError, TypeError, AttributeError):
            return None, [], False
        matches = state.get("identity") == identity and state.get("part_size") == part_size and \
            remote.evidence.promise is not None and bool(parts) and \
            [p.number for p in parts] == list(range(1, len(parts) + 1))
        in_progress = self._write("listing the uploads in progress at", lambda: self.api.list_multipart_uploads(
            self.bucket, key))
        if (key, upload_id) not in in_progress:
            if matches and sum(p.size for p in parts) == remote.size and \
                    _holds(self._head(remote.path), remote.size, _combined_crc64nvme(parts)):
                log.info("%s: its upload was completed by a run killed before verifying it; reading it back",
                         remote.path)
                with self._lock:
                    self._resumed += remote.size
                return upload_id, parts, True
            return None, [], False
        if matches:
            listed = {(p.number, p.size, p.etag): p.crc64nvme for p in self._write(
                "listing the parts of", lambda: self.api.list_parts(self.bucket, key, upload_id))}
            # Each recorded part must be there as uploaded: its size, its ETag and, where the server lists it
            # (AWS does; SeaweedFS 4.48 does not), its CRC64NVME. Matched by (number, ETag), as Complete names
            # parts: SeaweedFS 4.48 lists a part uploaded twice under one number twice.
            if all(listed.get((p.number, p.size, p.etag)) in ("", p.crc64nvme) for p in parts):
                done = sum(p.size for p in parts)
                with self._lock:
                    self._resumed += done
                log.info("%s: resuming its upload after %s (%s) already uploaded; the object is verified by "
                         "reading it back once complete", remote.path, counted(len(parts), "part"),
                         human_bytes(done))
                return upload_id, parts, False
        log.info("%s: the upload a previous run left cannot be continued (the source changed, or it has no "
                 "promise to verify it by); starting it again", remote.path)
        self._abandon(key, upload_id, None)
        return None, [], False

    def _save_state(self, state_key: str, identity: str, upload_id: str, part_size: int,
                    parts: list[UploadedPart]) -> None:
        """Which upload to continue after a kill, and its parts: no hash state (nothing here is trusted)."""
        body = {"identity": identity, "upload_id": upload_id, "part_size": part_size,
                "parts": [p._asdict() for p in parts]}
        self._write("saving the resume state at", lambda: self.api.put_object(self.bucket, state_key,
                                                                               *_json_object(body), {}))

    def _abandon(self, key: str, upload_id: str, state_key: str | None) -> None:
        """Abort an upload whose bytes failed their check (or cannot be continued); nothing of it remains."""
        from weightsync.sources.s3api import S3Error

        try:
            self.api.abort_multipart_upload(self.bucket, key, upload_id)
            if state_key:
                self.api.delete_object(self.bucket, state_key)
        except (S3Error, OSError) as exc:
            log.warning("could not abort the upload of %s (%s); a bucket lifecycle rule for incomplete multipart "
                        "uploads removes it", key, exc)

    # -- after the commit ----------------------------------------------------------------
    def _pending_deletions(self) -> set[str]:
        """The files an earlier run meant to delete after its commit, if it was killed before it could: its
        marker still lists them (a rerun of the same revision would otherwise never delete them)."""
        from weightsync.sources.s3api import S3Error

        def get() -> bytes | None:
            try:
                return self.api.get_small_object(self.bucket, self.key(MARKER))
            except S3Error as exc:
                if exc.status == 404 and exc.code != "NoSuchBucket":
                    return None
                raise

        text = self._write("reading the mirror state at", get)
        try:
            return {str(path) for path in json.loads(text).get("previous_paths", [])} if text else set()
        except (ValueError, AttributeError):
            return set()

    def _delete_removed(self, dropped: set[str], current: Lockfile) -> tuple[str, ...]:
        """Delete the files an earlier revision had and this one does not: only after the new lockfile is
        written, so a pod syncing meanwhile sees one complete revision or the other."""
        gone = sorted(dropped - current.by_path.keys())
        for path in gone:
            self._write(f"deleting {path} from", lambda p=path: self.api.delete_object(self.bucket, self.key(p)))
        if gone:
            event("mirror_deleted", "deleted %s the new revision no longer has: %s", counted(len(gone), "file"),
                  ", ".join(gone[:10]), paths=gone)
        return tuple(gone)

    def _clear_state(self) -> None:
        keys = [listed.key for listed in self._write("listing the mirror state at", lambda: list(
            self.api.list_objects(self.bucket, self.key(f"{STATE}/"))))]
        for key in keys:
            self._write("clearing the mirror state at", lambda k=key: self.api.delete_object(self.bucket, k))


class _Cancelled(Exception):
    """Another file failed, or the process is stopping: this one stops at its next part (resumable)."""


class _Voided(Exception):
    """A reply proved the promise being checked unsound (an SSE-KMS ETag): the file starts again with the next."""

    def __init__(self, remote: RemoteFile) -> None:
        super().__init__(remote.path)
        self.remote = remote


def _identity(remote: RemoteFile) -> str:
    """What a resumed upload must still be: the same path, size, identity at the source and chosen promise."""
    promise: Promise | None = remote.evidence.promise
    claim = [promise.algorithm, promise.value, promise.parts, promise.field] if promise else []
    text = json.dumps([remote.path, remote.size, remote.etag or "", claim])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _holds(head: dict[str, str] | None, size: int, crc: int) -> bool:
    """Whether a HeadObject reply is of an object of `size` bytes whose full-object CRC64NVME is `crc`."""
    from weightsync.sources.s3api import content_length

    expected = base64.b64encode(crc.to_bytes(8, "big")).decode()
    return head is not None and content_length(head) == size and head.get("x-amz-checksum-crc64nvme") == expected


def _combined_crc64nvme(parts: list[UploadedPart]) -> int:
    """The full object's CRC64NVME from its parts' (CRCs combine; no byte is read again)."""
    from awscrt.checksums import combine_crc64nvme

    crc = 0
    for part in parts:
        crc = combine_crc64nvme(crc, int.from_bytes(base64.b64decode(part.crc64nvme), "big"), part.size)
    return crc


def _json_object(body: dict[str, object]) -> tuple[bytes, str]:
    return _text_object(json.dumps(body))


def _text_object(text: str) -> tuple[bytes, str]:
    data = text.encode()
    return data, hashlib.sha256(data).hexdigest()


class _TargetErrors(S3ErrorMapper):
    """The target's S3 replies as exit codes: --to missing or denied is 3, a retryable failure 7 once retried; a
    digest the store refused (BadDigest) is retried too, since the part is sent again from the verified bytes."""

    credentials_for = " for the target"
    not_found_hint = "check the bucket in --to (create it first)"
    denied_hint = ("check the target's credentials and its bucket policy (the mirror needs s3:PutObject, "
                   "s3:GetObject, s3:DeleteObject, s3:ListBucket, s3:ListBucketMultipartUploads, "
                   "s3:AbortMultipartUpload)")
    certificate_of = "the target's"
    retried_codes = frozenset({*THROTTLED, "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
    changed_is_integrity = False


def mirror(request: MirrorRequest) -> MirrorResult:
    """Run one mirror and log its summary."""
    result = Mirror(request).run()
    event("mirrored", "%s", result.summary(), **result.fields())
    return result
