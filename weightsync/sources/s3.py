"""S3 and S3-compatible source (AWS, MinIO, Ceph, SeaweedFS).

The requests go through s3api.py (REST over http.client, SigV4), which honours the
standard AWS environment and files as boto3 does. This module adds what a model sync
needs: a listing under a prefix, the checksums each object promises, and ranged GETs
pinned to the listed ETag so an object rewritten mid-sync is noticed instead of
stitched together from two versions. A prefix that `weightsync mirror` wrote (a
`weightsync.lock` object at its root) is read as that lockfile says: the origin's
revision id, and its sha256 for every file (`S3Source._mirror_snapshot`).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from weightsync.checksums import ALGORITHMS, Promise, choose, from_base64
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import (
    LISTING_DIGEST,
    ErrorTranslator,
    Features,
    RemoteFile,
    Selection,
    Snapshot,
    listing_digest,
    retry_after,
    slugify,
)

if TYPE_CHECKING:
    from weightsync.sources.connections import RangeBody
    from weightsync.sources.s3api import S3Api

log = logging.getLogger("weightsync")
MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
MULTIPART_ETAG = re.compile(r"^([0-9a-f]{32})-([0-9]{1,5})$")
CHECKSUM_FIELDS = ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1")
NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
          "InvalidToken", "ExpiredToken", "AccountProblem"}
THROTTLED = {"SlowDown", "503", "500", "502", "504", "InternalError", "ServiceUnavailable",
             "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}


DESCRIBE_BELOW_MD5 = 8 * 1024 * 1024  # below this an MD5 ETag costs less CPU (~10 ms) than a HEAD request
MIRROR_LOCKFILE = "weightsync.lock"  # a mirror's commit point, at the root of its prefix (weightsync/mirror.py)
MIRROR_STATE = ".weightsync/"  # a mirror's resume state and in-progress marker, at the root of its prefix
PINNABLE = re.compile(r"^(?:[0-9a-f]{20}|[0-9a-f]{40}|[0-9a-f]{64})$")  # a listing digest; a mirror's commit
SAFE_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")  # a directory name on every volume


def _etag_promises(etag: str) -> tuple[Promise, ...]:
    """A single-part ETag is the object's MD5; a multipart one (`hex-N`) the MD5 of its N part MD5s."""
    if MD5_ETAG.match(etag):
        return (Promise("md5", etag, "ETag"),)
    match = MULTIPART_ETAG.match(etag)
    if match and int(match[2]) > 0:
        return (Promise("md5", match[1], "ETag", parts=int(match[2])),)
    return ()


def _etag_not_md5(headers: dict[str, str]) -> str:
    """Why this object's ETag is not an MD5 (server-side encryption with KMS or a customer key), or ""."""
    sse = headers.get("x-amz-server-side-encryption", "")
    if sse.startswith("aws:kms"):
        return f"the ETag of an {sse} (SSE-KMS) object is not an MD5"
    if headers.get("x-amz-server-side-encryption-customer-algorithm"):
        return "the ETag of an SSE-C object is not an MD5"
    return ""


def _head_promises(head: dict[str, str], listed: tuple[Promise, ...]) -> tuple[Promise, ...]:
    """What the listing promised (the ETag, a lockfile's sha256) plus everything a HeadObject reply vouches for."""
    from weightsync.sources.s3api import user_metadata

    not_md5 = _etag_not_md5(head)
    promises = [p.void(not_md5) if not_md5 and p.field == "ETag" else p for p in listed]
    composite_type = head.get("x-amz-checksum-type") == "COMPOSITE"
    for name in CHECKSUM_FIELDS:
        text = head.get(f"x-amz-checksum-{name.lower()}")
        if not text:
            continue
        promise = from_base64(name.lower(), text, f"Checksum{name}")
        if promise is None:
            continue
        if composite_type and not promise.parts:
            promise = promise.void(f"Checksum{name} is COMPOSITE but carries no part count")
        promises.append(promise)
    metadata = user_metadata(head)  # header names come lowercased
    if re.fullmatch(r"[0-9a-fA-F]{64}", metadata.get("sha256", "")):
        promises.append(Promise("sha256", metadata["sha256"].lower(), "x-amz-meta-sha256"))
    md5 = from_base64("md5", metadata.get("md5chksum", ""), "x-amz-meta-md5chksum")
    if md5 and not md5.parts and len(md5.value) == 32:
        promises.append(md5)
    return tuple(promises)


def _read_mirror_lockfile(text: bytes, where: str) -> tuple[str, str, list[tuple[str, int, str]]]:
    """(origin URI, revision, [(path, size, sha256)]) of a mirror's lockfile object: lockfile.py's format,
    read here for the three fields a sync needs (the source layer does not import the orchestration's)."""
    import json

    from weightsync.layout import check_relative_path

    body = json.loads(text)
    if body.get("weightsync_lockfile") != 1:
        raise ValueError(f"not a weightsync lockfile (format {body.get('weightsync_lockfile')!r})")
    entries = []
    for item in body["files"]:
        sha256 = str(item["sha256"]).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or int(item["size"]) < 0:
            raise ValueError(f"bad entry for {item.get('path')!r}")
        entries.append((check_relative_path(str(item["path"]), where), int(item["size"]), sha256))
    return str(body["source"]), str(body["revision"]), entries


def _with_layout(promise: Promise, layout: tuple[int, ...] | str, checksums: dict[str, tuple[str, ...]]) -> Promise:
    """A composite promise completed with the server's part layout, or voided with the reason it has none."""
    if not promise.parts:
        return promise
    if isinstance(layout, str):
        return promise.void(layout)
    if len(layout) != promise.parts:
        return promise.void(f"{promise.field} says {promise.parts} parts, the server lists {len(layout)}")
    return promise.with_layout(layout, checksums.get(promise.algorithm, ()))


@dataclass
class S3Source:
    """A bucket and prefix; each file's locator is its object key."""

    bucket: str
    prefix: str
    addressing_style: str = "auto"
    transfer: TransferConfig = DEFAULTS
    kind: str = "s3"
    default_ref: str | None = None
    features: ClassVar[Features] = Features(describes=True, promises=frozenset(ALGORITHMS) - {"git-sha1"},
                                            voids_promises=True)
    _api: S3Api | None = field(default=None, repr=False)
    _api_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS, *, addressing_style: str = "auto") -> S3Source:
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"--source {uri!r} has no bucket; use s3://bucket/prefix")
        return cls(bucket=bucket, prefix=prefix.strip("/"), addressing_style=addressing_style, transfer=transfer)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def default_name(self) -> str:
        return slugify("s3", self.bucket, self.prefix)

    @property
    def api(self) -> S3Api:
        """The S3 calls, built on first use: endpoint, region and credentials come from the environment then."""
        from weightsync.sources.s3api import S3Api

        with self._api_lock:
            if self._api is None:
                # One attempt per call: weightsync's own retry loop (retry.py) retries, honouring Retry-After on
                # 503 SlowDown, with --retries as the one bound.
                self._api = S3Api.from_environment(self.addressing_style, self.transfer.connect_timeout,
                                                   self.transfer.stall_timeout, self.transfer.concurrency + 4)
            return self._api

    def pinned_revision(self, revision: str | None) -> str | None:
        """A listing digest, or the revision a mirror's lockfile names (a 40-hex Hub commit, a 64-hex digest):
        both name immutable content, so a pinned warm start needs no request."""
        if revision and (LISTING_DIGEST.match(revision) or PINNABLE.match(revision)):
            return revision
        if revision:
            raise UsageError(
                f"--revision {revision!r} is not an S3 revision id; S3 revisions are the 20-hex digest "
                "weightsync prints after a sync, or the source's revision a `weightsync mirror` recorded (a 40-hex "
                "commit) — pin it to get zero-request warm starts, or leave it unset to take whatever the prefix "
                "holds now"
            )
        return None

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        listed, mirror = self._list()
        if mirror is not None:
            return self._mirror_snapshot(listed, mirror, selection)
        files = [f for f in listed if selection.matches(f.path)]
        if not files:
            raise SourceError(f"no objects under {self.uri}" + (" match the --include/--exclude filters"
                              if selection.key() else "") + "; check the bucket and prefix")
        digest = listing_digest([(f.path, f.size, f.etag or "") for f in files])
        return Snapshot(revision=digest, files=tuple(files))

    def _list(self) -> tuple[list[RemoteFile], RemoteFile | None]:
        """The objects under the prefix, and a mirror's lockfile object if its root holds one (not a model file).

        A mirror's own state (`.weightsync/`) is never a model file either; without a lockfile it means a first
        `weightsync mirror` is still running, and what is there is refused rather than synced half-complete.
        """
        list_prefix = f"{self.prefix}/" if self.prefix else ""
        from weightsync.sources.s3api import content_length

        files: list[RemoteFile] = []
        lockfile: RemoteFile | None = None
        mirroring = False
        with self._errors(f"listing {self.uri}"):
            for listed in self.api.list_objects(self.bucket, list_prefix):
                if listed.key.endswith("/"):
                    continue  # a "directory marker", not a file
                path = listed.key[len(list_prefix):]
                if path.startswith(MIRROR_STATE):
                    mirroring = True
                    continue
                remote = self._remote_file(listed.key, path, listed.size, listed.etag)
                if path == MIRROR_LOCKFILE:
                    lockfile = remote
                else:
                    files.append(remote)
            if mirroring and lockfile is None:
                raise SourceError(f"the mirror at {self.uri} is not complete yet (a `weightsync mirror` is writing it "
                                  "or was stopped); wait for it to finish, or rerun weightsync mirror")
            if not files and self.prefix:  # s3://bucket/path/to/model.safetensors: one object, not a prefix
                head = self._head(self.prefix, missing_ok=True)
                if head is not None:
                    name = self.prefix.rsplit("/", 1)[-1]
                    files.append(self._remote_file(self.prefix, name, content_length(head), head.get("etag", "")))
        return files, lockfile

    def _mirror_snapshot(self, listed: list[RemoteFile], lock_object: RemoteFile,
                         selection: Selection) -> Snapshot:
        """A prefix written by `weightsync mirror`: its lockfile object is the revision.

        The revision id is the original source's (the Hub commit), so a pod syncing the mirror publishes the same
        revision as one syncing the origin. Every file carries the lockfile's sha256 (what the mirror verified
        against the origin's own promise) besides the object's checksums. An object the lockfile names that is
        missing or of another size is exit 4: a mirror that was changed, or is being rewritten, is never synced.
        Objects the lockfile does not name (left by a newer mirror run that has not committed yet, or awaiting
        deletion after one that has) are not part of the revision.
        """
        where = f"s3://{self.bucket}/{lock_object.locator}"
        with self._errors(f"reading {where}"):
            text = self.api.get_small_object(self.bucket, lock_object.locator)
        try:
            origin, revision, entries = _read_mirror_lockfile(text, where)
        except (ValueError, KeyError, TypeError, IntegrityError) as exc:
            raise IntegrityError(f"the mirror at {self.uri} is incomplete or changed: its {MIRROR_LOCKFILE} is "
                                 f"unreadable ({exc}); rerun weightsync mirror") from exc
        by_path = {f.path: f for f in listed}
        problems: list[str] = []
        files: list[RemoteFile] = []
        for path, size, sha256 in entries:
            if not selection.matches(path):
                continue
            remote = by_path.get(path)
            if remote is None:
                problems.append(f"{path}: missing")
                continue
            if remote.size != size:
                problems.append(f"{path}: {remote.size} bytes, the lockfile says {size}")
                continue
            files.append(remote.with_promises(
                (*remote.promises, Promise("sha256", sha256, MIRROR_LOCKFILE, origin="lockfile"))))
        if problems:
            raise IntegrityError(f"the mirror at {self.uri} is incomplete or changed ({'; '.join(problems[:5])}); "
                                 "rerun weightsync mirror", path=problems[0].split(":")[0])
        if not files:
            raise SourceError(f"no files of the mirror at {self.uri} match the --include/--exclude filters")
        if not SAFE_REVISION.match(revision):  # an id that is no portable directory name (`sha256:...`)
            import hashlib

            revision = hashlib.sha256(revision.encode()).hexdigest()[:40]
        return Snapshot(revision=revision, files=tuple(files), extra={"mirror_of": origin})

    @staticmethod
    def _remote_file(key: str, path: str, size: int, etag: str) -> RemoteFile:
        etag = etag.strip('"')
        return RemoteFile(path=path, size=size, promises=_etag_promises(etag), etag=etag, locator=key)

    def _head(self, key: str, missing_ok: bool = False, part_number: int = 0) -> dict[str, str] | None:
        from weightsync.sources.s3api import S3Error

        try:
            return self.api.head_object(self.bucket, key, part_number)
        except S3Error as exc:
            if missing_ok and (exc.code in NOT_FOUND or exc.status == 404):
                return None
            raise

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        """Learn what the object promises: HeadObject (ChecksumMode=ENABLED), then the part layout if needed.

        Skipped (0 requests), unless `thorough`, where the listing's promise is good enough: a small
        object's MD5 ETag costs less than the request, and a lockfile's sha256 costs nothing.
        Otherwise the HEAD gives the Checksum* values and ChecksumType, SSE (whose ETag is no MD5)
        and uploader metadata (`sha256`, rclone's `md5chksum`); the part layout is fetched only
        when the cheapest promise is composite.
        """
        listed = choose(file.promises)
        mirrored = next((p for p in file.promises if p.field == MIRROR_LOCKFILE), None)
        if not thorough and mirrored is None and listed is not None and (listed.cost == 0 or
                                                                          file.size < DESCRIBE_BELOW_MD5):
            return file
        key = file.locator
        with self._errors(f"reading metadata of s3://{self.bucket}/{key}"):
            head = self._head(key) or {}
            requests = 1
            if file.etag and head.get("etag", "").strip('"') not in ("", file.etag):
                raise IntegrityError(f"s3://{self.bucket}/{key} changed at the source during the sync; rerun to "
                                     "sync the new revision")
            promises = _head_promises(head, file.promises)
            written = next((p for p in promises if p.field == "x-amz-meta-sha256"), None)
            if mirrored is not None and written is not None and written.value != mirrored.value:
                raise IntegrityError(f"the mirror at {self.uri} is incomplete or changed ({file.path}: its "
                                     f"x-amz-meta-sha256 is not the {MIRROR_LOCKFILE}'s); rerun weightsync mirror",
                                     path=file.path, expected=mirrored.value, got=written.value)
            chosen = choose(promises)
            cheapest = min((p for p in promises if not p.unusable), key=lambda p: p.cost, default=None)
            if cheapest is not None and cheapest.parts and (chosen is None or chosen.cost > cheapest.cost):
                layout, part_checksums, spent = self._part_layout(key, file.size, cheapest.parts)
                requests += spent
                promises = tuple(_with_layout(p, layout, part_checksums) for p in promises)
        return file.with_promises(promises, requests)

    def _part_layout(self, key: str, size: int, count: int) -> tuple[tuple[int, ...] | str, dict[str, tuple[str, ...]],
                                                                         int]:
        """The multipart upload's part sizes as the server reports them (and each part's checksums, where
        listed), or why they could not be had; plus the number of requests spent.

        GetObjectAttributes(ObjectParts) lists up to 1000 parts a request. Where it is refused (it needs its
        own IAM permission, s3:GetObjectAttributes) or lists no parts (AWS omits them for objects uploaded
        without a checksum), HeadObject with PartNumber=N gives each part's size, asked concurrently.
        """
        from weightsync.sources.s3api import S3Error

        sizes: list[int] = []
        checksums: dict[str, list[str]] = {}
        requests, marker = 0, 0
        try:
            next_marker: int | None = 0
            while next_marker is not None:
                requests += 1
                parts, next_marker = self.api.object_parts(self.bucket, key, marker)
                for part in parts:
                    sizes.append(part.size)
                    for algorithm, value in part.checksums.items():
                        if algorithm in ALGORITHMS:
                            checksums.setdefault(algorithm, []).append(value)
                marker = next_marker or 0
        except S3Error as exc:
            log.debug("GetObjectAttributes refused for s3://%s/%s (%s); asking each part's size instead", self.bucket,
                      key, exc.code)
            sizes = []
        if len(sizes) != count:
            sizes, checksums = self._part_sizes_by_head(key, count), {}
            requests += count
        if sum(sizes) != size:
            return (f"the server's part layout ({len(sizes)} parts, {sum(sizes)} bytes) does not add up to the "
                    f"object's {size} bytes"), {}, requests
        decoded = {algorithm: tuple(p.value if (p := from_base64(algorithm, v, "")) else "" for v in values)
                   for algorithm, values in checksums.items() if len(values) == count}
        return tuple(sizes), decoded, requests

    def _part_sizes_by_head(self, key: str, count: int) -> list[int]:
        from concurrent.futures import ThreadPoolExecutor

        from weightsync.sources.s3api import content_length

        def part_size(number: int) -> int:
            return content_length(self._head(key, part_number=number) or {})

        with ThreadPoolExecutor(max_workers=max(1, min(self.transfer.concurrency, count))) as pool:
            return list(pool.map(part_size, range(1, count + 1)))

    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged GET pinned to the listed ETag; an SSE-KMS / SSE-C reply voids the ETag's MD5 promise (the
        engine then falls back to what else was promised)."""
        from weightsync.sources.connections import RangeBody

        what = f"downloading s3://{self.bucket}/{file.locator}"
        with self._errors(what):
            body = self.api.get_object(self.bucket, file.locator, start, end, if_match=file.etag or "")
        not_md5 = _etag_not_md5(body.headers)
        return RangeBody(body, what, {"ETag": not_md5} if not_md5 else None)

    def _errors(self, what: str) -> S3ErrorMapper:
        return S3ErrorMapper(what)


class S3ErrorMapper(ErrorTranslator):
    """Translate S3 replies and connection errors into weightsync's exit-code classes, in one place.

    For the bucket a sync reads; `weightsync mirror` subclasses it for the bucket it writes (its hints name --to
    and the permissions a mirror needs, and a digest the store refused is retried: the part is sent again)."""

    credentials_for = ""  # whose credentials are missing, when it is not obvious: " for the target"
    not_found_hint = "check the bucket and prefix in --source"
    denied_hint = "check the credentials and the bucket policy"
    certificate_of = "the server's"
    retried_codes: frozenset[str] = frozenset(THROTTLED)
    changed_is_integrity = True  # a 412 to If-Match: the object a sync is reading changed under it

    def translate(self, exc: BaseException) -> Exception | None:
        import http.client
        import ssl

        from weightsync.sources.s3api import NoCredentialsError, S3Error

        what = self.what
        if isinstance(exc, NoCredentialsError):
            return SourceError(f"{what}: no AWS credentials found{self.credentials_for}; set AWS_ACCESS_KEY_ID/"
                               "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an IAM role (IRSA)")
        if isinstance(exc, S3Error):
            code, status = exc.code, exc.status
            if code in NOT_FOUND or status == 404:
                return SourceError(f"{what}: not found ({code}); {self.not_found_hint}")
            if code in DENIED or status in (401, 403):
                return SourceError(f"{what}: access denied ({code}); {self.denied_hint}")
            if self.changed_is_integrity and (code in ("PreconditionFailed", "412") or status == 412):
                return IntegrityError(f"{what}: the object changed at the source during the sync; rerun to "
                                      "sync the new revision")
            if code in self.retried_codes or status >= 500 or status == 429:
                return TransientError(f"{what}: {code}", retry_after(exc.headers.get("retry-after", "")))
            return SourceError(f"{what}: {code}: {exc.message}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return SourceError(f"{what}: {self.certificate_of} TLS certificate is not trusted "
                               f"({exc.verify_message}); for a private CA set AWS_CA_BUNDLE to its PEM file")
        if isinstance(exc, (OSError, http.client.HTTPException)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}")
        return None
