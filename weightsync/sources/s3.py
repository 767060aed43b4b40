"""S3 and S3-compatible source (AWS, MinIO, Ceph, SeaweedFS) through boto3.

boto3 already honours the standard environment (AWS_ENDPOINT_URL[_S3], AWS_PROFILE,
keys, AWS_REGION, AWS_CA_BUNDLE, IRSA web identity, instance roles), so this module
only adds what a model sync needs: a listing under a prefix, the checksums each
object promises, and ranged GETs pinned to the listed ETag so an object rewritten
mid-sync is noticed instead of stitched together from two versions.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from weightsync import __version__
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import LISTING_DIGEST, ErrorTranslator, RemoteFile, Selection, Snapshot, listing_digest, slugify

MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
          "InvalidToken", "ExpiredToken", "AccountProblem"}
THROTTLED = {"SlowDown", "503", "500", "502", "504", "InternalError", "ServiceUnavailable",
             "RequestTimeout", "RequestTimeTooSkewed", "Throttling", "ThrottlingException"}


def _hex_from_base64(value: str) -> str | None:
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        return None


@dataclass
class S3Source:
    bucket: str
    prefix: str
    addressing_style: str = "auto"
    stall_timeout: float = 60.0
    concurrency: int = 8
    kind: str = "s3"
    default_ref: str | None = None
    _client: Any = field(default=None, repr=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _single_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_uri(cls, uri: str, *, addressing_style: str = "auto", stall_timeout: float = 60.0,
                 concurrency: int = 8) -> S3Source:
        rest = uri[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UsageError(f"--source {uri!r} has no bucket; use s3://bucket/prefix")
        return cls(bucket=bucket, prefix=prefix.strip("/"), addressing_style=addressing_style,
                   stall_timeout=stall_timeout, concurrency=concurrency)

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
            connect_timeout=10,
            read_timeout=self.stall_timeout,
            max_pool_connections=self.concurrency + 4,
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
                    files.append(self._remote_file(key[len(list_prefix):], obj["Size"], obj.get("ETag", "")))
            if not files and self.prefix:
                head = self._head(self.prefix, missing_ok=True)
                if head is not None:
                    self._single_key = self.prefix
                    name = self.prefix.rsplit("/", 1)[-1]
                    files.append(self._remote_file(name, head["ContentLength"], head.get("ETag", "")))
        return files

    @staticmethod
    def _remote_file(path: str, size: int, etag: str) -> RemoteFile:
        etag = etag.strip('"')
        return RemoteFile(path=path, size=size, md5=etag if MD5_ETAG.match(etag) else None, etag=etag)

    def _key(self, file: RemoteFile) -> str:
        if self._single_key is not None:
            return self._single_key
        return f"{self.prefix}/{file.path}" if self.prefix else file.path

    def _head(self, key: str, missing_ok: bool = False) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as exc:
            if missing_ok and self._code(exc) in NOT_FOUND:
                return None
            raise

    def describe(self, file: RemoteFile) -> RemoteFile:
        """Ask for a full-object SHA-256 when the listing's ETag is not an MD5 (multipart uploads).

        Sources of a SHA-256, best first: the object's ChecksumSHA256 (full-object, not the
        composite `...-N` form of multipart uploads), user metadata `sha256` (hex), and
        rclone's `md5chksum` metadata for multipart objects.
        """
        if file.md5:
            return file
        with self._errors(f"reading metadata of s3://{self.bucket}/{self._key(file)}"):
            head = self._head(self._key(file)) or {}
        sha256 = None
        checksum = head.get("ChecksumSHA256") or ""
        if checksum and "-" not in checksum:
            sha256 = _hex_from_base64(checksum)
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        if not sha256 and re.fullmatch(r"[0-9a-fA-F]{64}", metadata.get("sha256", "")):
            sha256 = metadata["sha256"].lower()
        md5 = _hex_from_base64(metadata["md5chksum"]) if "md5chksum" in metadata else None
        return RemoteFile(path=file.path, size=file.size, sha256=sha256, md5=md5, etag=file.etag)

    def open_range(self, file: RemoteFile, start: int, end: int) -> Any:
        key = self._key(file)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if file.etag:
            args["IfMatch"] = f'"{file.etag}"'
        with self._errors(f"downloading s3://{self.bucket}/{key}"):
            response = self.client.get_object(**args)
        sse = response.get("ServerSideEncryption", "")
        md5_untrusted = sse.startswith("aws:kms") or bool(response.get("SSECustomerAlgorithm"))
        return _S3Range(response["Body"], self._errors(f"downloading s3://{self.bucket}/{key}"), md5_untrusted)

    @staticmethod
    def _code(exc: Any) -> str:
        return str(exc.response.get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""

    def _errors(self, what: str) -> _S3ErrorMapper:
        return _S3ErrorMapper(what)


class _S3Range:
    """A GET body whose read errors become TransientError, so the engine resumes the range.

    `md5_untrusted` is set for SSE-KMS / SSE-C objects, whose ETag is not an MD5.

    The bytes are read with http.client's `readinto` straight from the socket into the
    caller's buffer. botocore's StreamingBody.readinto goes through urllib3 2.x, whose
    `readinto` is `read()` plus a copy: a fresh bytes object and a second memcpy for
    every buffer, about a quarter of the client's CPU per byte (benchmarks/README.md).
    The plain path stays for any body that is not exactly that stack.
    """

    def __init__(self, body: Any, errors: _S3ErrorMapper, md5_untrusted: bool) -> None:
        self._body = body
        self._errors = errors
        self.md5_untrusted = md5_untrusted
        self._raw, self._socket_response = _direct_stream(body)

    def readinto(self, buffer: memoryview) -> int:
        try:
            if self._socket_response is None:
                return self._body.readinto(buffer)
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
