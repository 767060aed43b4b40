"""Google Cloud Storage source: `gs://bucket/prefix` (or `gs://bucket/path/to/one.object`).

The JSON API over the sources' own connections (connections.py), not google-cloud-storage: one
paginated `objects.list` under the prefix (name, size, generation, crc32c, md5Hash), then ranged
`alt=media` GETs pinned with `generation=` to the generation listed, so an object rewritten or
deleted after listing fails (GCS answers 404 for a generation that is no longer live) instead of
splicing two versions. Every file is verified by its CRC32C (GCS computes one for every object,
composite ones included) and, where GCS lists one, its MD5 (composite objects have none).

The endpoint is read as google-cloud-storage reads it: `STORAGE_EMULATOR_HOST` (host:port or a URL;
no credentials are sent then), else `API_ENDPOINT_OVERRIDE` (a URL, e.g. a Private Service Connect
endpoint; credentials are sent), else https://storage.googleapis.com. Credentials are Application
Default Credentials from google-auth (`pip install weightsync[gcs]`), imported only when a token is
needed: GOOGLE_APPLICATION_CREDENTIALS (service account key, authorized_user, external_account /
workload identity federation), gcloud's ADC file, or the GCE / GKE metadata server (Workload Identity).
The token is refreshed through urllib3 (which botocore already brings), so the requests transport and
its dependencies are not needed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode, urlsplit

from weightsync import __version__
from weightsync.checksums import Promise, from_base64
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import (
    TRANSIENT_STATUS,
    ErrorTranslator,
    Features,
    RemoteFile,
    Selection,
    Snapshot,
    listed_snapshot,
    pinned_listing_digest,
    retry_after,
    slugify,
)

if TYPE_CHECKING:
    from weightsync.sources.connections import Body, Pool, RangeBody

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
READ_ONLY_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
LIST_FIELDS = "nextPageToken,items(name,size,generation,crc32c,md5Hash)"
OBJECT_FIELDS = "name,size,generation,crc32c,md5Hash"
USER_AGENT = f"weightsync/{__version__}"
INSTALL_HINT = "pip install weightsync[gcs]"


def storage_endpoint() -> tuple[str, bool]:
    """(base URL, whether to send credentials), from the environment google-cloud-storage reads."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if emulator:
        return (emulator if "://" in emulator else f"http://{emulator}").rstrip("/"), False
    override = os.environ.get("API_ENDPOINT_OVERRIDE", "").strip()
    return (override or DEFAULT_ENDPOINT).rstrip("/"), True


class GoogleAuthErrors(ErrorTranslator):
    """google-auth's exceptions as weightsync's: bad or missing credentials are exit 3, an unreachable
    token endpoint or metadata server is retried. Only the first line of the exception is kept (at most 200
    characters): it names the file or the endpoint's error (`invalid_grant: ...`), which is what the user needs;
    the key and the token are never in it, and logs.redact strips access tokens in any case."""

    def translate(self, exc: BaseException) -> Exception | None:
        from google.auth import exceptions

        detail = _first_line(exc)
        if isinstance(exc, exceptions.DefaultCredentialsError):
            return SourceError(f"{self.what}: no usable Google credentials ({detail}); set "
                               "GOOGLE_APPLICATION_CREDENTIALS to a key or credential configuration file, run "
                               "`gcloud auth application-default login`, or use Workload Identity")
        if isinstance(exc, exceptions.RefreshError):
            # A metadata server or token endpoint that did not answer (GKE's Workload Identity server while a pod
            # starts, a 5xx): retried, and exit 7 if it stays so. A refused grant or key: exit 3.
            if getattr(exc, "retryable", False) or isinstance(exc.__cause__, exceptions.TransportError):
                return TransientError(f"{self.what}: refreshing the Google access token failed: {detail}")
            return SourceError(f"{self.what}: the Google credentials were refused ({detail}); check "
                               "GOOGLE_APPLICATION_CREDENTIALS or the workload's service account")
        if isinstance(exc, exceptions.TransportError):
            return TransientError(f"{self.what}: cannot reach the Google token endpoint: {detail}")
        if isinstance(exc, exceptions.GoogleAuthError):
            return SourceError(f"{self.what}: Google credentials: {detail}")
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return (text.strip().splitlines() or [type(exc).__name__])[0][:200]


class Credentials:
    """Application Default Credentials, loaded on the first request that needs them and refreshed whenever
    google-auth says the token is no longer valid (it refreshes a little before the expiry)."""

    def __init__(self) -> None:
        self._credentials: Any = None
        self._lock = threading.Lock()

    def authorization(self, what: str, connect_timeout: float, read_timeout: float) -> str:
        """The `Authorization` header value for a request; a token request is bounded by the sync's timeouts
        (urllib3's default is to wait forever, and google-auth sets none for token endpoints)."""
        with self._lock, GoogleAuthErrors(what):
            try:
                import google.auth
                import google.auth.transport.urllib3
                import urllib3
            except ImportError as exc:
                raise SourceError(f"{what}: gs:// needs google-auth for Google credentials: {INSTALL_HINT} (or set "
                                  "STORAGE_EMULATOR_HOST for an emulator)") from exc
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[READ_ONLY_SCOPE])
            if not self._credentials.valid:
                http = _ProxiedHttp(urllib3, urllib3.Timeout(connect=connect_timeout, read=read_timeout))
                self._credentials.refresh(google.auth.transport.urllib3.Request(http))
            return f"Bearer {self._credentials.token}"


class _ProxiedHttp:
    """urllib3 for google-auth's token requests, through HTTPS_PROXY / HTTP_PROXY unless NO_PROXY exempts the
    host (as the storage requests; a plain PoolManager would ignore the proxy). The metadata server is always
    reached directly: it is link-local to the node, and no proxy can reach it."""

    def __init__(self, urllib3: Any, timeout: Any) -> None:
        self._urllib3, self._timeout = urllib3, timeout
        self._direct = urllib3.PoolManager(timeout=timeout)
        self._proxied: dict[str, Any] = {}

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        from weightsync.sources.connections import proxy_for

        parts = urlsplit(url)
        metadata = {"metadata.google.internal", "169.254.169.254",
                    urlsplit(f"//{os.environ.get('GCE_METADATA_HOST', '')}").hostname}
        proxy = None if parts.hostname in metadata else proxy_for(parts.scheme, parts.hostname or "")
        if proxy is None:
            return self._direct.request(method, url, **kwargs)
        address = proxy.geturl()
        if address not in self._proxied:
            self._proxied[address] = self._urllib3.ProxyManager(address, timeout=self._timeout)
        return self._proxied[address].request(method, url, **kwargs)


@dataclass
class GcsSource:
    """A bucket and prefix; each file's locator is `object name#generation`."""

    bucket: str
    prefix: str
    transfer: TransferConfig = DEFAULTS
    kind: str = "gs"
    default_ref: str | None = None
    features: ClassVar[Features] = Features(promises=frozenset({"crc32c", "md5"}))
    _connections: Pool | None = field(default=None, repr=False)
    _credentials: Credentials = field(default_factory=Credentials, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS) -> GcsSource:
        bucket, _, prefix = uri[len("gs://"):].partition("/")
        if not bucket:
            raise UsageError(f"--source {uri!r} has no bucket; use gs://bucket/prefix")
        return cls(bucket=bucket, prefix=prefix.strip("/"), transfer=transfer)

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"

    @property
    def default_name(self) -> str:
        return slugify("gs", self.bucket, self.prefix)

    def pinned_revision(self, revision: str | None) -> str | None:
        return pinned_listing_digest(revision, "gs://")

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        return listed_snapshot(self._list(), selection, f"objects under {self.uri}", "check the bucket and prefix")

    def _list(self) -> list[RemoteFile]:
        list_prefix = f"{self.prefix}/" if self.prefix else ""
        what = f"listing {self.uri}"
        files: list[RemoteFile] = []
        token = ""
        while True:  # GCS returns at most 1000 objects a page, and a nextPageToken while there are more
            query = {"prefix": list_prefix, "fields": LIST_FIELDS, "prettyPrint": "false"}
            if token:
                query["pageToken"] = token
            page = self._json(f"/storage/v1/b/{quote(self.bucket, safe='')}/o?{urlencode(query)}", what,
                              f"bucket gs://{self.bucket} not found")
            for item in page.get("items") or ():
                name = str(item.get("name", ""))
                if name.endswith("/"):
                    continue  # a "directory marker" (the console's "create folder"), not a file
                files.append(_remote_file(item, name[len(list_prefix):]))
            token = str(page.get("nextPageToken") or "")
            if not token:
                break
        if not files and self.prefix:  # gs://bucket/path/to/model.gguf: one object, not a prefix
            item = self._json(f"/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(self.prefix, safe='')}?"
                              f"{urlencode({'fields': OBJECT_FIELDS, 'prettyPrint': 'false'})}", what, None)
            if item:
                files.append(_remote_file(item, self.prefix.rsplit("/", 1)[-1]))
        return files

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged `alt=media` GET of exactly the listed generation, read straight from the socket."""
        from weightsync.sources.connections import RangeBody

        name, _, generation = file.locator.rpartition("#")
        what = f"downloading gs://{self.bucket}/{name}"
        query = urlencode({"alt": "media", "generation": generation})
        # Accept-Encoding: gzip keeps GCS from decompressing an object stored with Content-Encoding: gzip
        # ("decompressive transcoding", which ignores Range): the stored bytes are what size and crc32c describe.
        body = self._request(f"/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}?{query}",
                             {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "gzip"}, what)
        status = body.status
        if status in (404, 412):
            body.close()
            raise IntegrityError(f"{what}: generation {generation} is gone (HTTP {status}): the object was "
                                 "rewritten or deleted after it was listed; sync again to take the new version")
        if status != 206 and not (status == 200 and start == 0 and end == file.size):
            if status == 200:
                body.close()
                raise IntegrityError(f"{what}: the server ignored the byte range; cannot resume safely")
            raise self._status(body, what, None)
        served = body.headers.get("x-goog-generation")
        if served and served != generation:
            body.close()
            raise IntegrityError(f"{what}: asked for generation {generation}, got {served}; sync again")
        if status == 206 and not body.headers.get("content-range", "").startswith(f"bytes {start}-{end - 1}/"):
            body.close()
            raise TransientError(f"{what}: unexpected Content-Range {body.headers.get('content-range')!r}")
        return RangeBody(body, what)

    def _json(self, target: str, what: str, not_found: str | None) -> Any:
        """One API call's JSON object; None for a 404 when `not_found` is None (the caller's "no such object")."""
        import json

        body = self._request(target, {}, what)
        if body.status == 404 and not_found is None:
            body.close()
            return None
        if body.status != 200:
            raise self._status(body, what, not_found)
        try:
            data = body.read_all()
        except OSError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise SourceError(f"{what}: the reply is not JSON ({data[:80]!r}); check STORAGE_EMULATOR_HOST or "
                              "API_ENDPOINT_OVERRIDE") from exc
        if not isinstance(parsed, dict):
            raise SourceError(f"{what}: the reply is not a JSON object")
        return parsed

    def _request(self, target: str, extra: dict[str, str], what: str) -> Body:
        """GET `target` on the storage endpoint, with a token unless an emulator is named."""
        import http.client

        base, authenticate = storage_endpoint()
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"the GCS endpoint {base!r} is not an http(s) URL; check STORAGE_EMULATOR_HOST or "
                             "API_ENDPOINT_OVERRIDE")
        headers = {"Host": parts.netloc, "User-Agent": USER_AGENT, **extra}
        if authenticate:
            headers["Authorization"] = self._credentials.authorization(what, self.transfer.connect_timeout,
                                                                       self.transfer.stall_timeout)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            return self._pool.send(parts.scheme, parts.hostname, port, "GET", parts.path.rstrip("/") + target,
                                   headers)
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _status(self, body: Body, what: str, not_found: str | None) -> Exception:
        """The error an unexpected reply means, with GCS's own message where it sent one; the body is dropped."""
        status, headers = body.status, body.headers
        message = _error_message(body)
        if status in TRANSIENT_STATUS:
            return TransientError(f"{what}: HTTP {status}{message}", retry_after(headers.get("retry-after", "")))
        if status == 404:
            return SourceError(f"{what}: {not_found or 'not found'} (HTTP 404){message}; check the bucket and "
                               "prefix")
        if status in (401, 403):
            _, authenticated = storage_endpoint()
            hint = ("check GOOGLE_APPLICATION_CREDENTIALS or the workload's service account, and that it may read "
                    "the bucket (roles/storage.objectViewer)") if authenticated else "the emulator refused it"
            return SourceError(f"{what}: access denied (HTTP {status}){message}; {hint}")
        return SourceError(f"{what}: HTTP {status}{message}")

    @property
    def _pool(self) -> Pool:
        from weightsync.sources.connections import Pool

        with self._pool_lock:
            if self._connections is None:
                self._connections = Pool(self.transfer.connect_timeout, self.transfer.stall_timeout,
                                         self.transfer.concurrency + 4)
            return self._connections


def _remote_file(item: dict[str, Any], path: str) -> RemoteFile:
    """A listed object: its CRC32C and (unless composite) MD5 promises, its generation as identity and locator."""
    name, generation = str(item["name"]), str(item.get("generation", ""))
    promises: list[Promise] = []
    for algorithm, key in (("crc32c", "crc32c"), ("md5", "md5Hash")):
        promise = from_base64(algorithm, str(item.get(key) or ""), key) if item.get(key) else None
        if promise is not None and not promise.parts:
            promises.append(promise)
    return RemoteFile(path=path, size=int(item.get("size") or 0), promises=tuple(promises), etag=generation,
                      locator=f"{name}#{generation}")


def _error_message(body: Body) -> str:
    """`: <GCS's error message>` from a JSON error reply, or "" (a proxy's HTML, an empty body)."""
    import json

    try:
        data = body.read_all()[:4096]
        message = json.loads(data)["error"]["message"]
    except Exception:
        body.close()
        return ""
    return f": {str(message).splitlines()[0][:200]}" if message else ""

