"""S3's REST API over http.client: the four calls a sync makes, signed with SigV4, without botocore.

Why not boto3: importing botocore and building an S3 client costs ~0.35 CPU-seconds and
~42 MB of RSS more on every cold start (benchmarks/README.md, "S3 transports"), more CPU
than hashing half a GiB, before the first byte. A sync needs four calls (ListObjectsV2, HeadObject,
GetObjectAttributes, a ranged GetObject), each a few lines of REST. `weightsync mirror` adds the writes
(PutObject, the multipart calls, an in-place CopyObject for metadata, DeleteObject), each with a full-object
checksum the server checks.

What this module honours, as boto3 does (README "Sources"):
- endpoint: `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, the profile's `endpoint_url` or its
  `services` section (unless `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`), else AWS's regional
  endpoint (`AWS_USE_FIPS_ENDPOINT`, `AWS_USE_DUALSTACK_ENDPOINT`);
- region: `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region`, else us-east-1; a
  bucket in another region is followed once (`x-amz-bucket-region`), as botocore does;
- `AWS_PROFILE`, `AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CA_BUNDLE` (or the
  profile's `ca_bundle`), `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`;
- credentials (`credentials()`): the environment's keys first (botocore's first provider
  too); else awscrt's default chain (C, ~0.1 s: profiles, credential_process, assume-role,
  IRSA web identity, ECS / EKS Pod Identity, IMDS), which refreshes expiring credentials
  itself; botocore's chain only for SSO profiles or where awscrt finds nothing.

Every request is one attempt: the engine's retry loop (retry.py) decides what is retried.
The one retry here is a request on a pooled keep-alive connection that the server had
already closed, which no byte of a reply can have come from.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import os
import re
import threading
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from weightsync import __version__
from weightsync.sources.connections import Body, Pool

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
USER_AGENT = f"weightsync/{__version__}"
DNS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
IP_HOST = re.compile(r"^(\d{1,3}\.){3}\d{1,3}$|^\[?[0-9a-fA-F:]+\]?$")
REDIRECT_STATUSES = (301, 307, 400)
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
Payload = bytes | bytearray | memoryview | None


class NoCredentialsError(Exception):
    """No provider in the chain had credentials."""


class S3Error(Exception):
    """An S3 error reply: HTTP status, the XML `Code` (or the status for a HEAD), `Message`, headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(f"{code or status}: {message}" if message else str(code or status))
        self.status, self.code, self.message, self.headers = status, code or str(status), message, headers


class Credentials(NamedTuple):
    access_key: str
    secret_key: str
    token: str = ""


# ----------------------------------------------------------------------------- configuration

def _config_section(path: str, section: str) -> dict[str, str]:
    """One section of an AWS ini file ({} when absent); a nested block (`s3 =` + indented lines) is kept raw."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(os.path.expanduser(path))
    except configparser.Error:
        return {}
    return dict(parser.items(section)) if parser.has_section(section) else {}


def _nested(text: str) -> dict[str, str]:
    """The `key = value` lines of a nested block such as `s3 =\\n  addressing_style = path`."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


@dataclass(frozen=True)
class S3Settings:
    """Where requests go and how they are signed, resolved once from the environment and the AWS files."""

    region: str
    endpoint: str  # scheme://host[:port][/base], no trailing slash
    custom_endpoint: bool
    addressing_style: str
    ca_bundle: str
    profile: str
    profile_settings: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_environment(cls, addressing_style: str = "auto") -> S3Settings:
        env = os.environ
        profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
        config_file = env.get("AWS_CONFIG_FILE", "~/.aws/config")
        settings = _config_section(config_file, "default" if profile == "default" else f"profile {profile}")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or settings.get("region") or "us-east-1"
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
        if not endpoint and not _truthy(env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or
                                        settings.get("ignore_configured_endpoint_urls")):
            services = _config_section(config_file, f"services {settings['services']}") \
                if settings.get("services") else {}
            endpoint = _nested(services.get("s3", "")).get("endpoint_url") or settings.get("endpoint_url", "")
        custom = bool(endpoint)
        if not custom:
            fips = _truthy(env.get("AWS_USE_FIPS_ENDPOINT") or settings.get("use_fips_endpoint"))
            dualstack = _truthy(env.get("AWS_USE_DUALSTACK_ENDPOINT") or settings.get("use_dualstack_endpoint"))
            endpoint = aws_endpoint(region, fips, dualstack)
        if "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        style = addressing_style
        if style == "auto":
            style = _nested(settings.get("s3", "")).get("addressing_style", "auto")
        ca_bundle = env.get("AWS_CA_BUNDLE") or settings.get("ca_bundle", "")
        return cls(region=region, endpoint=endpoint.rstrip("/"), custom_endpoint=custom, addressing_style=style,
                   ca_bundle=os.path.expanduser(ca_bundle) if ca_bundle else "", profile=profile,
                   profile_settings=settings)


def aws_endpoint(region: str, fips: bool = False, dualstack: bool = False) -> str:
    """AWS's regional S3 endpoint (`s3.dualstack.eu-west-1.amazonaws.com`, `.amazonaws.com.cn` in China)."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://s3{'-fips' if fips else ''}{'.dualstack' if dualstack else ''}.{region}.{suffix}"


# ----------------------------------------------------------------------------- credentials

class CredentialChain:
    """The credentials to sign the next request with; providers are asked once, refreshed by their own logic."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._get: Any = None  # () -> Credentials, once resolved

    def current(self) -> Credentials:
        with self._lock:
            if self._get is None:
                self._get = self._resolve()
        return self._get()

    def _resolve(self) -> Any:
        env = os.environ
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            static = Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or "")
            return lambda: static
        uses_sso = any(name.startswith("sso_") for name in self._settings.profile_settings)
        if not uses_sso:
            from_crt = _awscrt_chain()
            if from_crt is not None:
                return from_crt
        from_botocore = _botocore_chain(self._settings.profile)
        if from_botocore is not None:
            return from_botocore
        raise NoCredentialsError("no AWS credentials found")


def _awscrt_chain() -> Any:
    """awscrt's default provider chain, or None when it has no credentials (its errors are its own logs)."""
    from awscrt.auth import AwsCredentialsProvider

    provider = AwsCredentialsProvider.new_default_chain()

    def get() -> Credentials:
        found = provider.get_credentials().result()
        return Credentials(found.access_key_id, found.secret_access_key, found.session_token or "")

    try:
        get()
    except Exception:  # awscrt raises its own AwsCrtError for "no provider had credentials"
        return None
    return get


def _botocore_chain(profile: str) -> Any:
    """botocore's chain (SSO and anything awscrt lacks): imported only when the fast paths found nothing."""
    import botocore.session

    found = botocore.session.Session(profile=None if profile == "default" else profile).get_credentials()
    if found is None:
        return None

    def get() -> Credentials:
        frozen = found.get_frozen_credentials()  # refreshes temporary credentials before they expire
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token or "")

    return get


# ----------------------------------------------------------------------------- signing

def quote_path(path: str) -> str:
    """S3's canonical URI encoding: every byte but unreserved characters and `/`, encoded once."""
    return urllib.parse.quote(path, safe="/~")


def canonical_query(query: dict[str, str]) -> str:
    return "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                    for k, v in sorted(query.items()))


def sign(method: str, host: str, path: str, query: dict[str, str], headers: dict[str, str], region: str,
         credentials: Credentials, now: datetime.datetime, payload_hash: str = EMPTY_SHA256) -> dict[str, str]:
    """The request's headers with SigV4's `Authorization` (and `x-amz-date`, token, payload hash) added.

    Every header given is signed (they are all ours). A read's payload is empty, so its hash is the empty
    string's; a write signs the payload's sha256 where it is known anyway (a PutObject's file, an XML body),
    and `UNSIGNED-PAYLOAD` for an UploadPart, whose bytes its x-amz-checksum-crc64nvme header guards instead.
    """
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    signed = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    signed.update({"host": host, "x-amz-date": stamp, "x-amz-content-sha256": payload_hash})
    if credentials.token:
        signed["x-amz-security-token"] = credentials.token
    names = sorted(signed)
    canonical = "\n".join([method, path, canonical_query(query), *(f"{n}:{signed[n]}" for n in names), "",
                           ";".join(names), payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = f"AWS4{credentials.secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return signed


# ----------------------------------------------------------------------------- the API

class ListedObject(NamedTuple):
    key: str
    size: int
    etag: str


class Part(NamedTuple):
    size: int
    checksums: dict[str, str]  # "crc32" -> base64, as the server lists it


class UploadedPart(NamedTuple):
    """One part of a multipart upload in progress, as UploadPart answered or ListParts lists it."""

    number: int
    size: int
    etag: str
    crc64nvme: str  # base64, as S3 sends it


def _b64(hex_digest: str) -> str:
    import base64

    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _metadata_headers(metadata: dict[str, str]) -> dict[str, str]:
    return {f"x-amz-meta-{name}": value for name, value in metadata.items()}


class S3Api:
    """One endpoint's S3 calls. Thread-safe: each request takes its own connection from the pool."""

    def __init__(self, settings: S3Settings, connect_timeout: float, read_timeout: float, pool_size: int) -> None:
        self.settings = settings
        self.credentials = CredentialChain(settings)
        self._pool = Pool(connect_timeout, read_timeout, pool_size, settings.ca_bundle)
        self._regions: dict[str, str] = {}  # bucket -> region, learnt from a redirect

    @classmethod
    def from_environment(cls, addressing_style: str, connect_timeout: float, read_timeout: float,
                         pool_size: int) -> S3Api:
        return cls(S3Settings.from_environment(addressing_style), connect_timeout, read_timeout, pool_size)

    def list_objects(self, bucket: str, prefix: str) -> Iterator[ListedObject]:
        """ListObjectsV2, every page; keys come url-encoded (so any byte survives XML) and are decoded here."""
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if token:
                query["continuation-token"] = token
            root = _xml(self._call("GET", bucket, "", query).body)
            for item in root.iter("Contents"):
                yield ListedObject(urllib.parse.unquote_plus(_text(item, "Key")), int(_text(item, "Size") or 0),
                                   _text(item, "ETag").strip('"'))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return

    def head_object(self, bucket: str, key: str, part_number: int = 0) -> dict[str, str]:
        """HeadObject with checksum mode on: the reply's headers, names lowercased."""
        query = {"partNumber": str(part_number)} if part_number else {}
        return self._call("HEAD", bucket, key, query, {"x-amz-checksum-mode": "ENABLED"}).headers

    def object_parts(self, bucket: str, key: str, marker: int) -> tuple[list[Part], int | None]:
        """One page of GetObjectAttributes(ObjectParts): the parts, and the next marker (None on the last)."""
        reply = self._call("GET", bucket, key, {"attributes": ""}, {
            "x-amz-object-attributes": "ObjectParts", "x-amz-max-parts": "1000",
            "x-amz-part-number-marker": str(marker)})
        parts_node = _xml(reply.body).find("ObjectParts")
        if parts_node is None:
            return [], None
        parts = [Part(int(_text(node, "Size") or 0),
                      {child.tag[8:].lower(): (child.text or "") for child in node if child.tag.startswith("Checksum")})
                 for node in parts_node.iter("Part")]
        more = _text(parts_node, "IsTruncated") == "true"
        return parts, int(_text(parts_node, "NextPartNumberMarker") or 0) if more else None

    def get_object(self, bucket: str, key: str, start: int, end: int, if_match: str = "") -> Body:
        """A ranged GET of bytes [start, end); the body streams. A server that ignores Range is an error."""
        headers = {"range": f"bytes={start}-{end - 1}"}
        if if_match:
            headers["if-match"] = f'"{if_match}"'
        reply = self._call("GET", bucket, key, {}, headers, stream=True)
        assert reply.stream is not None
        length = reply.headers.get("content-length", "")
        if reply.status != 206 and not (reply.status == 200 and start == 0 and length == str(end)):
            reply.stream.close()
            raise S3Error(reply.status, "RangeIgnored", f"asked for bytes {start}-{end - 1}, the server sent "
                          f"{reply.headers.get('content-range') or length + ' bytes'}", reply.headers)
        return reply.stream

    # -- writes (weightsync mirror): full-object checksums on every object

    def get_small_object(self, bucket: str, key: str) -> bytes:
        """A whole small object (a mirror's lockfile), read into memory."""
        return self._call("GET", bucket, key, {}).body

    def put_object(self, bucket: str, key: str, data: bytes | bytearray | memoryview, sha256_hex: str,
                   metadata: dict[str, str]) -> dict[str, str]:
        """PutObject with `x-amz-checksum-sha256`: the server refuses the write (BadDigest) unless the bytes it
        received hash to the sha256 the caller verified; the same sha256 signs the payload."""
        headers = {"x-amz-checksum-sha256": _b64(sha256_hex), "content-type": "application/octet-stream",
                   **_metadata_headers(metadata)}
        return self._call("PUT", bucket, key, {}, headers, body=data, payload_hash=sha256_hex).headers

    def create_multipart_upload(self, bucket: str, key: str, metadata: dict[str, str]) -> str:
        """CreateMultipartUpload asking for a full-object CRC64NVME (x-amz-checksum-type FULL_OBJECT); the upload id."""
        headers = {"x-amz-checksum-algorithm": "CRC64NVME", "x-amz-checksum-type": "FULL_OBJECT",
                   "content-type": "application/octet-stream", **_metadata_headers(metadata)}
        reply = self._call("POST", bucket, key, {"uploads": ""}, headers)
        upload_id = _text(_xml(reply.body), "UploadId")
        if not upload_id:
            raise S3Error(reply.status, "MalformedReply", "CreateMultipartUpload answered no UploadId", reply.headers)
        return upload_id

    def upload_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes | bytearray | memoryview,
                    crc64nvme_hex: str) -> UploadedPart:
        """UploadPart with the part's CRC64NVME: the server refuses a part whose bytes do not match it."""
        crc = _b64(crc64nvme_hex)
        reply = self._call("PUT", bucket, key, {"partNumber": str(number), "uploadId": upload_id},
                           {"x-amz-checksum-crc64nvme": crc}, body=data, payload_hash=UNSIGNED_PAYLOAD)
        return UploadedPart(number, len(data), reply.headers.get("etag", "").strip('"'), crc)

    def complete_multipart_upload(self, bucket: str, key: str, upload_id: str, parts: list[UploadedPart],
                                  crc64nvme_hex: str) -> dict[str, str]:
        """CompleteMultipartUpload with every part's CRC64NVME and the full object's, which the server checks
        against the one it combines from the parts (FULL_OBJECT)."""
        from xml.sax.saxutils import escape

        xml = "".join(f"<Part><PartNumber>{p.number}</PartNumber><ETag>{escape(chr(34) + p.etag + chr(34))}</ETag>"
                      f"<ChecksumCRC64NVME>{p.crc64nvme}</ChecksumCRC64NVME></Part>" for p in parts)
        body = f"<CompleteMultipartUpload>{xml}</CompleteMultipartUpload>".encode()
        headers = {"x-amz-checksum-crc64nvme": _b64(crc64nvme_hex), "x-amz-checksum-type": "FULL_OBJECT",
                   "content-type": "application/xml"}
        reply = self._call("POST", bucket, key, {"uploadId": upload_id}, headers, body=body,
                           payload_hash=hashlib.sha256(body).hexdigest())
        if b"<Error>" in reply.body[:200]:  # S3 may answer 200 and put the error in the body
            raise _error(_Reply(500, reply.headers, reply.body, None))
        return reply.headers

    def replace_metadata(self, bucket: str, key: str, metadata: dict[str, str]) -> None:
        """CopyObject onto itself with new metadata (objects up to 5 GiB): how an object completed before its
        sha256 was known gets `x-amz-meta-sha256`; the copy keeps a full-object CRC64NVME."""
        headers = {"x-amz-copy-source": quote_path(f"/{bucket}/{key}"), "x-amz-metadata-directive": "REPLACE",
                   "x-amz-checksum-algorithm": "CRC64NVME", "content-type": "application/octet-stream",
                   **_metadata_headers(metadata)}
        reply = self._call("PUT", bucket, key, {}, headers)
        if b"<Error>" in reply.body[:200]:  # like Complete, a copy may answer 200 and fail in the body
            raise _error(_Reply(500, reply.headers, reply.body, None))

    def list_multipart_uploads(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload in progress under `prefix`."""
        found: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:
            query = {"uploads": "", "prefix": prefix, **markers}
            root = _xml(self._call("GET", bucket, "", query).body)
            found += [(_text(node, "Key"), _text(node, "UploadId")) for node in root.iter("Upload")]
            if _text(root, "IsTruncated") != "true":
                return found
            markers = {"key-marker": _text(root, "NextKeyMarker"),
                       "upload-id-marker": _text(root, "NextUploadIdMarker")}

    def list_parts(self, bucket: str, key: str, upload_id: str) -> list[UploadedPart]:
        """The parts of an upload in progress, every page."""
        parts: list[UploadedPart] = []
        marker = "0"
        while True:
            root = _xml(self._call("GET", bucket, key, {"uploadId": upload_id, "part-number-marker": marker}).body)
            parts += [UploadedPart(int(_text(node, "PartNumber")), int(_text(node, "Size") or 0),
                                   _text(node, "ETag").strip('"'), _text(node, "ChecksumCRC64NVME"))
                      for node in root.iter("Part")]
            if _text(root, "IsTruncated") != "true":
                return parts
            marker = _text(root, "NextPartNumberMarker")

    def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        self._call("DELETE", bucket, key, {"uploadId": upload_id})

    def delete_object(self, bucket: str, key: str) -> None:
        self._call("DELETE", bucket, key, {})

    # -- one request

    def _call(self, method: str, bucket: str, key: str, query: dict[str, str], headers: dict[str, str] | None = None,
              stream: bool = False, body: Payload = None, payload_hash: str = EMPTY_SHA256) -> _Reply:
        reply = self._once(method, bucket, key, query, headers or {}, stream, body, payload_hash)
        region = reply.headers.get("x-amz-bucket-region", "") or _region_in_error(reply)
        if reply.status in REDIRECT_STATUSES and region and region != self._region(bucket):
            self._regions[bucket] = region  # the bucket lives elsewhere: botocore follows this too
            if reply.stream is not None:
                reply.stream.close()
            reply = self._once(method, bucket, key, query, headers or {}, stream, body, payload_hash)
        if reply.status >= 300:
            raise _error(reply)
        return reply

    def _region(self, bucket: str) -> str:
        return self._regions.get(bucket, self.settings.region)

    def _url(self, bucket: str, key: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path) for the object: virtual-hosted or path-style, as configured."""
        region = self._region(bucket)
        endpoint = self.settings.endpoint
        if not self.settings.custom_endpoint and region != self.settings.region:
            endpoint = aws_endpoint(region)
        parts = urllib.parse.urlsplit(endpoint)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        base = parts.path.rstrip("/")
        if self._virtual(bucket, scheme, host):
            return scheme, f"{bucket}.{host}", port, quote_path(f"{base}/{key}")
        return scheme, host, port, quote_path(f"{base}/{bucket}/{key}" if key else f"{base}/{bucket}/")

    def _virtual(self, bucket: str, scheme: str, host: str) -> bool:
        style = self.settings.addressing_style
        if style != "auto":
            return style == "virtual"
        # auto, as botocore: virtual-hosted where the bucket is a DNS label and the endpoint a name, not an address
        # (and, unlike botocore, not `localhost`, whose subdomains rarely resolve)
        dotted_tls = "." in bucket and scheme == "https"
        return (bool(DNS_BUCKET.match(bucket)) and ".." not in bucket and not IP_HOST.match(bucket) and not dotted_tls
                and not IP_HOST.match(host) and host != "localhost")

    def _once(self, method: str, bucket: str, key: str, query: dict[str, str], headers: dict[str, str],
              stream: bool, body: Payload = None, payload_hash: str = EMPTY_SHA256) -> _Reply:
        scheme, host, port, path = self._url(bucket, key)
        default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        host_header = host if default_port else f"{host}:{port}"
        signed = sign(method, host_header, path, query, headers, self._region(bucket), self.credentials.current(),
                      datetime.datetime.now(datetime.UTC), payload_hash)
        signed["user-agent"] = USER_AGENT  # unsigned, as botocore leaves it: proxies may rewrite it
        target = path + (f"?{canonical_query(query)}" if query else "")
        reply = self._pool.send(scheme, host, port, method, target, signed, body)
        if stream and reply.status < 300:
            return _Reply(reply.status, reply.headers, b"", reply)
        return _Reply(reply.status, reply.headers, reply.read_all(), None)


class _Reply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    stream: Body | None


def _xml(body: bytes) -> ElementTree.Element:
    """An S3 XML reply with its namespace dropped from every tag, so lookups read `Contents`, not `{...}Contents`;
    a reply that is not XML (a proxy's error page, damaged bytes) is an S3Error of its own code."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise S3Error(200, "MalformedReply", f"the reply is not S3's XML ({exc}): {body[:80]!r}", {}) from exc
    for node in root.iter():
        node.tag = node.tag.rpartition("}")[2]
    return root


def _text(node: ElementTree.Element, tag: str) -> str:
    found = node.find(tag)
    return (found.text or "") if found is not None else ""


def _region_in_error(reply: _Reply) -> str:
    """AWS's `AuthorizationHeaderMalformed` names the bucket's region in its body when the header is absent."""
    if reply.status != 400 or b"<Region>" not in reply.body:
        return ""
    try:
        return _text(_xml(reply.body), "Region")
    except S3Error:
        return ""


def _error(reply: _Reply) -> S3Error:
    code = message = ""
    if reply.body:
        try:
            root = _xml(reply.body)
            code, message = _text(root, "Code"), _text(root, "Message")
        except S3Error:
            message = reply.body[:200].decode(errors="replace")
    return S3Error(reply.status, code, message, reply.headers)


def content_length(headers: dict[str, str]) -> int:
    return int(headers.get("content-length") or 0)


def user_metadata(headers: dict[str, str]) -> dict[str, str]:
    """`x-amz-meta-*` headers as boto3's `Metadata` (names without the prefix)."""
    return {name[len("x-amz-meta-"):]: value for name, value in headers.items() if name.startswith("x-amz-meta-")}
