"""S3 and S3-compatible source (AWS, MinIO, Ceph, SeaweedFS) through boto3.

boto3 already honours the standard environment (AWS_ENDPOINT_URL[_S3], AWS_PROFILE,
keys, AWS_REGION, AWS_CA_BUNDLE, IRSA web identity, instance roles), so this module
only adds what a model sync needs: a listing under a prefix, the checksums each
object promises, and ranged GETs pinned to the listed ETag so an object rewritten
mid-sync is noticed instead of stitched together from two versions.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar

from weightsync import __version__
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
    slugify,
)

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


def _etag_promises(etag: str) -> tuple[Promise, ...]:
    """A single-part ETag is the object's MD5; a multipart one (`hex-N`) the MD5 of its N part MD5s."""
    if MD5_ETAG.match(etag):
        return (Promise("md5", etag, "ETag"),)
    match = MULTIPART_ETAG.match(etag)
    if match and int(match[2]) > 0:
        return (Promise("md5", match[1], "ETag", parts=int(match[2])),)
    return ()


def _etag_not_md5(response: dict[str, Any]) -> str:
    """Why this object's ETag is not an MD5 (server-side encryption with KMS or a customer key), or ""."""
    sse = str(response.get("ServerSideEncryption", ""))
    if sse.startswith("aws:kms"):
        return f"the ETag of an {sse} (SSE-KMS) object is not an MD5"
    if response.get("SSECustomerAlgorithm"):
        return "the ETag of an SSE-C object is not an MD5"
    return ""


def _head_promises(head: dict[str, Any], listed: tuple[Promise, ...]) -> tuple[Promise, ...]:
    """What the listing promised (the ETag, a lockfile's sha256) plus everything a HeadObject reply vouches for."""
    not_md5 = _etag_not_md5(head)
    promises = [p.void(not_md5) if not_md5 and p.field == "ETag" else p for p in listed]
    composite_type = head.get("ChecksumType") == "COMPOSITE"
    for name in CHECKSUM_FIELDS:
        text = head.get(f"Checksum{name}")
        if not text:
            continue
        promise = from_base64(name.lower(), text, f"Checksum{name}")
        if promise is None:
            continue
        if composite_type and not promise.parts:
            promise = promise.void(f"Checksum{name} is COMPOSITE but carries no part count")
        promises.append(promise)
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    if re.fullmatch(r"[0-9a-fA-F]{64}", metadata.get("sha256", "")):
        promises.append(Promise("sha256", metadata["sha256"].lower(), "x-amz-meta-sha256"))
    md5 = from_base64("md5", metadata.get("md5chksum", ""), "x-amz-meta-md5chksum")
    if md5 and not md5.parts and len(md5.value) == 32:
        promises.append(md5)
    return tuple(promises)


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
    _client: Any = field(default=None, repr=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": self.addressing_style},
            # One attempt per call: weightsync's own retry loop (retry.py) retries, honouring Retry-After on
            # 503 SlowDown, with --retries as the one bound (botocore's retries would multiply it and ignore
            # Retry-After).
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=self.transfer.connect_timeout,
            read_timeout=self.transfer.stall_timeout,
            max_pool_connections=self.transfer.concurrency + 4,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra=f"weightsync/{__version__}",
            tcp_keepalive=True,
        )
        return boto3.session.Session().client("s3", config=config)

    def pinned_revision(self, revision: str | None) -> str | None:
        if revision and LISTING_DIGEST.match(revision):
            return revision
        if revision:
            raise UsageError(
                f"--revision {revision!r} is not an S3 revision id; S3 revisions are the 20-hex digest "
                "weightsync prints after a sync (pin it to get zero-request warm starts) — leave it unset "
                "to take whatever the prefix holds now"
            )
        return None

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        files = [f for f in self._list() if selection.matches(f.path)]
        if not files:
            raise SourceError(f"no objects under {self.uri}" + (" match the --include/--exclude filters"
                              if selection.key() else "") + "; check the bucket and prefix")
        digest = listing_digest([(f.path, f.size, f.etag or "") for f in files])
        return Snapshot(revision=digest, files=tuple(files))

    def _list(self) -> list[RemoteFile]:
        list_prefix = f"{self.prefix}/" if self.prefix else ""
        files: list[RemoteFile] = []
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(f"listing {self.uri}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=list_prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue  # a "directory marker", not a file
                    files.append(self._remote_file(key, key[len(list_prefix):], obj["Size"], obj.get("ETag", "")))
            if not files and self.prefix:  # s3://bucket/path/to/model.safetensors: one object, not a prefix
                head = self._head(self.prefix, missing_ok=True)
                if head is not None:
                    name = self.prefix.rsplit("/", 1)[-1]
                    files.append(self._remote_file(self.prefix, name, head["ContentLength"], head.get("ETag", "")))
        return files

    @staticmethod
    def _remote_file(key: str, path: str, size: int, etag: str) -> RemoteFile:
        etag = etag.strip('"')
        return RemoteFile(path=path, size=size, promises=_etag_promises(etag), etag=etag, locator=key)

    def _head(self, key: str, missing_ok: bool = False, **extra: Any) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED", **extra)
        except ClientError as exc:
            if missing_ok and self._code(exc) in NOT_FOUND:
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
        if not thorough and listed is not None and (listed.cost == 0 or file.size < DESCRIBE_BELOW_MD5):
            return file
        key = file.locator
        with self._errors(f"reading metadata of s3://{self.bucket}/{key}"):
            head = self._head(key) or {}
            requests = 1
            if file.etag and head.get("ETag", "").strip('"') not in ("", file.etag):
                raise IntegrityError(f"s3://{self.bucket}/{key} changed at the source during the sync; rerun to "
                                     "sync the new revision")
            promises = _head_promises(head, file.promises)
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
        from botocore.exceptions import ClientError

        sizes: list[int] = []
        checksums: dict[str, list[str]] = {}
        requests, marker = 0, 0
        try:
            while True:
                requests += 1
                reply = self.client.get_object_attributes(Bucket=self.bucket, Key=key, ObjectAttributes=["ObjectParts"],
                                                          MaxParts=1000, PartNumberMarker=marker)
                parts = reply.get("ObjectParts") or {}
                for part in parts.get("Parts") or []:
                    sizes.append(int(part["Size"]))
                    for name, value in part.items():
                        if name.startswith("Checksum") and name[8:].lower() in ALGORITHMS:
                            checksums.setdefault(name[8:].lower(), []).append(value)
                if not parts.get("IsTruncated"):
                    break
                marker = int(parts["NextPartNumberMarker"])
        except ClientError as exc:
            log.debug("GetObjectAttributes refused for s3://%s/%s (%s); asking each part's size instead", self.bucket,
                      key, self._code(exc))
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

        def part_size(number: int) -> int:
            return int((self._head(key, PartNumber=number) or {})["ContentLength"])

        with ThreadPoolExecutor(max_workers=max(1, min(self.transfer.concurrency, count))) as pool:
            return list(pool.map(part_size, range(1, count + 1)))

    def open_range(self, file: RemoteFile, start: int, end: int) -> _S3Range:
        key = file.locator
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if file.etag:
            args["IfMatch"] = f'"{file.etag}"'
        with self._errors(f"downloading s3://{self.bucket}/{key}"):
            response = self.client.get_object(**args)
        return _S3Range(response["Body"], self._errors(f"downloading s3://{self.bucket}/{key}"),
                        _etag_not_md5(response))

    @staticmethod
    def _code(exc: Any) -> str:
        return str(exc.response.get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""

    def _errors(self, what: str) -> _S3ErrorMapper:
        return _S3ErrorMapper(what)


class _S3Range:
    """A GET body whose read errors become TransientError, so the engine resumes the range.

    `voids` names the promise field this response proved unsound: an SSE-KMS / SSE-C
    object's ETag is not an MD5 (the engine then falls back to what else was promised).

    The bytes are read with http.client's `readinto` straight from the socket into the
    caller's buffer. botocore's StreamingBody.readinto goes through urllib3 2.x, whose
    `readinto` is `read()` plus a copy: a fresh bytes object and a second memcpy for
    every buffer, about a quarter of the client's CPU per byte (benchmarks/README.md).
    The plain path stays for any body that is not exactly that stack.
    """

    def __init__(self, body: Any, errors: _S3ErrorMapper, etag_not_md5: str) -> None:
        self._body = body
        self._errors = errors
        self.voids: dict[str, str] = {"ETag": etag_not_md5} if etag_not_md5 else {}
        self._raw, self._socket_response = _direct_stream(body)
        self._read_directly = self._socket_response is not None

    def readinto(self, buffer: memoryview) -> int:
        try:
            if not self._read_directly:
                return self._body.readinto(buffer)
            if self._socket_response is None:  # read to the end directly: botocore's body never saw those bytes
                return 0
            count = self._socket_response.readinto(buffer)
            if self._socket_response.isclosed():  # the whole body is read: the connection goes back to the pool
                self._raw.release_conn()
                self._socket_response = None
            return count
        except Exception as exc:
            raise TransientError(f"{self._errors.what}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection must not mask the real error
            self._body.close()


def _direct_stream(body: Any) -> tuple[Any, Any]:
    """(urllib3 response, http.client response) under a plain botocore StreamingBody, else (None, None)."""
    import http.client

    from botocore.response import StreamingBody

    if type(body) is not StreamingBody:
        return None, None
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)
    if (not isinstance(response, http.client.HTTPResponse) or not hasattr(raw, "release_conn")
            or getattr(raw, "_decoder", None) is not None or response.isclosed()):
        return None, None
    return raw, response


class _S3ErrorMapper(ErrorTranslator):
    """Translate botocore exceptions into weightsync's exit-code classes, in one place."""

    def translate(self, exc: BaseException) -> Exception | None:
        from botocore import exceptions as bx

        what = self.what
        if isinstance(exc, bx.NoCredentialsError):
            return SourceError(f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                               "AWS_PROFILE, or use an IAM role (IRSA)")
        if isinstance(exc, bx.ClientError):
            code = S3Source._code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in NOT_FOUND or status == 404:
                return SourceError(f"{what}: not found ({code}); check the bucket and prefix in --source")
            if code in DENIED or status in (401, 403):
                return SourceError(f"{what}: access denied ({code}); check the credentials and the bucket "
                                   "policy")
            if code in ("PreconditionFailed", "412") or status == 412:
                return IntegrityError(f"{what}: the object changed at the source during the sync; rerun to "
                                      "sync the new revision")
            if code in THROTTLED or status >= 500 or status == 429:
                retry_after = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("retry-after")
                return TransientError(f"{what}: {code or status}",
                                      float(retry_after) if retry_after and retry_after.isdigit() else None
                                      )
            return SourceError(f"{what}: {code or status}: {exc.response.get('Error', {}).get('Message', '')}"
                               )
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                            bx.ConnectTimeoutError, bx.ResponseStreamingError, bx.IncompleteReadError)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}")
        if isinstance(exc, bx.ParamValidationError):
            return UsageError(f"{what}: {exc}")
        if isinstance(exc, (bx.BotoCoreError, OSError)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}")
        return None
