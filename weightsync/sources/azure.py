"""Azure Blob Storage source: `az://account/container/prefix` and `https://<account>.blob.core.windows.net/...`.

Three calls of the Blob REST API (List Blobs, Get Blob Properties for a single-blob URI, a ranged Get Blob
pinned by If-Match to the listed ETag) over the sources' own connections (connections.py), without
azure-storage-blob: its import and its per-read parsing would be a fixed and a per-byte cost of every cold sync,
as botocore's and httpx's were (benchmarks/README.md).

Credentials, first found wins, read as the az CLI and the SDK's users set them:
1. a SAS token: the query string of --source, else `AZURE_STORAGE_SAS_TOKEN`;
2. `AZURE_STORAGE_CONNECTION_STRING`: its SharedAccessSignature or AccountKey (`UseDevelopmentStorage=true`:
   the emulator's account); its BlobEndpoint (or DefaultEndpointsProtocol / EndpointSuffix) is the endpoint of an
   az:// source even where it carries no credential;
3. `AZURE_STORAGE_KEY` (with `AZURE_STORAGE_ACCOUNT`, as the az CLI names them), signed with Shared Key here;
4. azure-identity's DefaultAzureCredential (workload identity, managed identity, az login...), imported only
   then (`pip install weightsync[azure]`), its bearer token refreshed before it expires.

TLS trusts the system's CAs, or the PEM bundle in REQUESTS_CA_BUNDLE (what the az CLI and azure-core read).

What is verified: a blob's Content-MD5, where it has one (Put Blob always sets it; a block upload only when the
uploader sends one, as azcopy --put-md5 does); anything else is checked by size only, and reported so.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from weightsync import __version__
from weightsync.checksums import from_base64
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import (
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

API_VERSION = "2024-08-04"  # x-ms-version: any version since 2017-11-09 takes bearer tokens
STORAGE_SCOPE = "https://storage.azure.com/.default"
USER_AGENT = f"weightsync/{__version__}"
AZURE_HOST = re.compile(r"^([a-z0-9]{3,24})\.blob\.core\.windows\.net$", re.IGNORECASE)
ACCOUNT_NAME = re.compile(r"^[a-z0-9]{3,24}$")
DEV_ACCOUNT = "devstoreaccount1"
# The storage emulator's well-known key (Microsoft's docs, every SDK): what `UseDevelopmentStorage=true` means.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
DEV_ENDPOINT = f"http://127.0.0.1:10000/{DEV_ACCOUNT}"
# Shared Key's string-to-sign: the verb, these standard headers in this order, the x-ms-* headers, the resource.
SIGNED_STANDARD_HEADERS = ("content-encoding", "content-language", "content-length", "content-md5", "content-type",
                           "date", "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range")
TOKEN_REFRESH_MARGIN = 300.0  # seconds before expiry a bearer token is renewed (azure-core's margin too)
NOT_FOUND = {"ContainerNotFound", "BlobNotFound", "ResourceNotFound"}
THROTTLED = {"ServerBusy", "OperationTimedOut", "InternalError"}
LIST_PAGE = 5000  # blobs per List Blobs page: the service's maximum (and default)


def is_azure_blob_url(uri: str) -> bool:
    """Whether `uri` is an Azure Blob Storage URL (`https://<account>.blob.core.windows.net/...`), for open_source
    to route before any generic https:// handling."""
    if not uri.lower().startswith("https://"):
        return False
    return bool(AZURE_HOST.match(urllib.parse.urlsplit(uri).hostname or ""))


# ----------------------------------------------------------------------------- settings and credentials

def parse_connection_string(text: str) -> dict[str, str]:
    """`Key=value;...` as the SDKs read it: names case-insensitive (kept in canonical case), values may hold `=`."""
    canonical = {name.lower(): name for name in ("AccountName", "AccountKey", "BlobEndpoint", "SharedAccessSignature",
                                                 "DefaultEndpointsProtocol", "EndpointSuffix",
                                                 "UseDevelopmentStorage")}
    settings: dict[str, str] = {}
    for item in text.split(";"):
        name, sep, value = item.strip().partition("=")
        if not sep or not name.strip():
            continue
        settings[canonical.get(name.strip().lower(), name.strip())] = value.strip()
    return settings


class Auth(NamedTuple):
    """How requests are authorised, and where that came from (named in 'access denied' errors, never the value)."""

    kind: str  # "sas", "shared-key" or "bearer"
    origin: str
    secret: str = ""  # the SAS query string, or the base64 account key; empty for bearer


@dataclass(frozen=True)
class Settings:
    """Where requests go and how they are authorised, resolved once from the URI and the environment."""

    account: str
    endpoint: str  # scheme://host[:port][/base], no trailing slash
    auth: Auth = field(repr=False)
    ca_bundle: str = ""  # REQUESTS_CA_BUNDLE, the private CA the az CLI and azure-core trust

    @classmethod
    def resolve(cls, account: str, uri_sas: str, uri_endpoint: str) -> Settings:
        env = os.environ
        text = env.get("AZURE_STORAGE_CONNECTION_STRING", "")
        # A SAS URL names its endpoint and credential both: a connection string for some other account is not its.
        conn = parse_connection_string(text) if text and not (uri_sas and uri_endpoint) else {}
        development = conn.get("UseDevelopmentStorage", "").lower() == "true"
        conn_account = DEV_ACCOUNT if development else conn.get("AccountName", "")
        if conn_account and conn_account != account:
            raise UsageError(f"AZURE_STORAGE_CONNECTION_STRING is for storage account {conn_account!r}, but "
                             f"--source names account {account!r}")
        endpoint = uri_endpoint or conn.get("BlobEndpoint", "") or (DEV_ENDPOINT if development else "")
        if not endpoint:
            protocol = conn.get("DefaultEndpointsProtocol", "https")
            endpoint = f"{protocol}://{account}.blob.{conn.get('EndpointSuffix', 'core.windows.net')}"
        if "://" not in endpoint:
            endpoint = f"https://{endpoint}"
        ca_bundle = env.get("REQUESTS_CA_BUNDLE", "")
        return cls(account=account, endpoint=endpoint.rstrip("/"),
                   auth=_credential(account, uri_sas, conn, development),
                   ca_bundle=os.path.expanduser(ca_bundle) if ca_bundle else "")


def _credential(account: str, uri_sas: str, conn: dict[str, str], development: bool) -> Auth:
    env = os.environ
    if uri_sas:
        return Auth("sas", "the SAS token in --source", uri_sas)
    if env.get("AZURE_STORAGE_SAS_TOKEN"):
        return Auth("sas", "AZURE_STORAGE_SAS_TOKEN", env["AZURE_STORAGE_SAS_TOKEN"].strip().lstrip("?"))
    if conn.get("SharedAccessSignature"):
        return Auth("sas", "the SharedAccessSignature of AZURE_STORAGE_CONNECTION_STRING",
                    conn["SharedAccessSignature"].lstrip("?"))
    if conn.get("AccountKey") or development:
        return Auth("shared-key", "the AccountKey of AZURE_STORAGE_CONNECTION_STRING",
                    _checked_key(conn.get("AccountKey") or DEV_KEY, "AZURE_STORAGE_CONNECTION_STRING's AccountKey"))
    if env.get("AZURE_STORAGE_KEY"):
        named = env.get("AZURE_STORAGE_ACCOUNT", "")
        if named and named != account:
            raise UsageError(f"AZURE_STORAGE_KEY is for AZURE_STORAGE_ACCOUNT {named!r}, but --source names account "
                             f"{account!r}")
        return Auth("shared-key", "AZURE_STORAGE_KEY", _checked_key(env["AZURE_STORAGE_KEY"], "AZURE_STORAGE_KEY"))
    return Auth("bearer", "DefaultAzureCredential (azure-identity)")


def _checked_key(key: str, origin: str) -> str:
    import base64
    import binascii

    try:
        base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{origin} is not a storage account key (base64, as the portal shows it)") from None
    return key.strip()


class BearerTokens:
    """DefaultAzureCredential's token for Azure Storage, fetched on first use and renewed before it expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credential: Any = None
        self._token = ""
        self._expires_on = 0.0

    def header(self) -> str:
        import time

        with self._lock:
            if not self._token or self._expires_on - time.time() < TOKEN_REFRESH_MARGIN:
                if self._credential is None:
                    self._credential = _default_credential()
                found = self._credential.get_token(STORAGE_SCOPE)
                self._token, self._expires_on = found.token, float(found.expires_on)
            return f"Bearer {self._token}"


def _default_credential() -> Any:
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        raise SourceError("no Azure credentials in the environment (AZURE_STORAGE_SAS_TOKEN, "
                          "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_KEY), and DefaultAzureCredential (managed or "
                          "workload identity, az login) needs azure-identity: pip install weightsync[azure]") from None
    return DefaultAzureCredential()


# ----------------------------------------------------------------------------- Shared Key

def shared_key(account: str, key: str, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> str:
    """The `Authorization: SharedKey account:signature` of a request (Azure Storage's Shared Key scheme).

    `path` is the URL path as sent (percent-encoded), `query` the decoded parameters; every x-ms-* header given is
    signed. The headers here are lowercase ASCII names, for which the service's header order is plain sorting.
    """
    import base64
    import hashlib
    import hmac

    lowered = {name.lower(): value for name, value in headers.items() if value}
    if lowered.get("content-length") == "0":
        del lowered["content-length"]
    standard = "".join(f"{lowered.get(name, '')}\n" for name in SIGNED_STANDARD_HEADERS)
    ms_headers = "".join(f"{name}:{lowered[name]}\n" for name in sorted(lowered) if name.startswith("x-ms-"))
    resource = f"/{account}{path}" + "".join(f"\n{name.lower()}:{value}" for name, value in sorted(query.items()))
    to_sign = f"{method}\n{standard}{ms_headers}{resource}"
    digest = hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()
    return f"SharedKey {account}:{base64.b64encode(digest).decode()}"


# ----------------------------------------------------------------------------- the API

class AzureError(Exception):
    """A Blob service error reply: HTTP status, `x-ms-error-code` (or the XML Code), message, headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(f"{code or status}: {message}" if message else str(code or status))
        self.status, self.code, self.message, self.headers = status, code or str(status), message, headers


class ListedBlob(NamedTuple):
    name: str
    size: int
    etag: str
    content_md5: str  # base64, "" when the blob has none
    is_folder: bool


class BlobApi:
    """One account's Blob calls. Thread-safe: each request takes its own connection from the pool."""

    def __init__(self, settings: Settings, connect_timeout: float, read_timeout: float, pool_size: int) -> None:
        from weightsync.sources.connections import Pool

        self.settings = settings
        self._pool: Pool = Pool(connect_timeout, read_timeout, pool_size, settings.ca_bundle)
        self._tokens = BearerTokens() if settings.auth.kind == "bearer" else None

    def list_blobs(self, container: str, prefix: str) -> Iterator[ListedBlob]:
        """List Blobs (flat, with metadata for ADLS folder markers), every page."""
        marker = ""
        while True:
            query = {"restype": "container", "comp": "list", "include": "metadata", "maxresults": str(LIST_PAGE)}
            if prefix:
                query["prefix"] = prefix
            if marker:
                query["marker"] = marker
            root = _xml(self._call("GET", container, "", query).read_all())
            for blob in root.iter("Blob"):
                name_node = blob.find("Name")
                name = (name_node.text or "") if name_node is not None else ""
                if name_node is not None and name_node.get("Encoded") == "true":
                    name = urllib.parse.unquote(name)
                properties = blob.find("Properties")
                props = {child.tag: child.text or "" for child in properties} if properties is not None else {}
                metadata = blob.find("Metadata")
                meta = {child.tag.lower(): (child.text or "") for child in metadata} if metadata is not None else {}
                folder = (meta.get("hdi_isfolder", "").lower() == "true" or props.get("ResourceType") == "directory")
                yield ListedBlob(name, int(props.get("Content-Length") or 0), props.get("Etag", "").strip('"'),
                                 props.get("Content-MD5", ""), folder)
            marker = _text(root, "NextMarker")
            if not marker:
                return

    def blob_properties(self, container: str, name: str) -> dict[str, str]:
        """Get Blob Properties (HEAD): the reply's headers, names lowercased."""
        body = self._call("HEAD", container, name, {})
        body.read_all()
        return body.headers

    def get_blob(self, container: str, name: str, start: int, end: int, if_match: str) -> Body:
        """Bytes [start, end) of the blob, only if its ETag is still `if_match`; the body streams."""
        headers = {"x-ms-range": f"bytes={start}-{end - 1}"}
        if if_match:
            headers["if-match"] = f'"{if_match}"'
        body = self._call("GET", container, name, {}, headers)
        length = body.headers.get("content-length", "")
        if body.status != 206 and not (body.status == 200 and start == 0 and length == str(end)):
            body.close()
            raise AzureError(body.status, "RangeIgnored", f"asked for bytes {start}-{end - 1}, the server sent "
                             f"{body.headers.get('content-range') or length + ' bytes'}", body.headers)
        return body

    def _call(self, method: str, container: str, name: str, query: dict[str, str],
              headers: dict[str, str] | None = None) -> Body:
        """One request; a reply of status >= 300 raises AzureError, any other's body is the caller's to read."""
        import email.utils

        parts = urllib.parse.urlsplit(self.settings.endpoint)
        scheme, host = parts.scheme, parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        path = urllib.parse.quote(f"{parts.path}/{container}" + (f"/{name}" if name else ""), safe="/~")
        sent = {**(headers or {}), "x-ms-version": API_VERSION, "x-ms-date": email.utils.formatdate(usegmt=True)}
        auth = self.settings.auth
        target = path + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
        if auth.kind == "sas":
            target += ("&" if query else "?") + auth.secret
        elif auth.kind == "shared-key":
            sent["authorization"] = shared_key(self.settings.account, auth.secret, method, path, query, sent)
        elif self._tokens is not None:
            sent["authorization"] = self._tokens.header()
        sent["host"] = host if (scheme, port) in (("https", 443), ("http", 80)) else f"{host}:{port}"
        sent["user-agent"] = USER_AGENT
        body = self._pool.send(scheme, host, port, method, target, sent)
        if body.status >= 300:
            raise _error(body)
        return body


def _xml(data: bytes) -> Any:
    """A Blob service XML reply (no namespaces); a reply that is not XML is an AzureError of its own code."""
    import xml.etree.ElementTree as ElementTree

    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise AzureError(200, "MalformedReply", f"the reply is not the Blob service's XML ({exc}): {data[:80]!r}",
                         {}) from exc


def _text(node: Any, tag: str) -> str:
    found = node.find(tag)
    return (found.text or "") if found is not None else ""


def _error(body: Body) -> AzureError:
    data = body.read_all()  # a HEAD reply has none: its code is in x-ms-error-code
    code, message = body.headers.get("x-ms-error-code", ""), ""
    if data:
        try:
            root = _xml(data)
            code, message = code or _text(root, "Code"), _text(root, "Message").split("\n", 1)[0]
        except AzureError:
            message = data[:200].decode(errors="replace")
    return AzureError(body.status, code, message, body.headers)


# ----------------------------------------------------------------------------- the source

def _parse_uri(uri: str) -> tuple[str, str, str, str, str]:
    """(account, container, prefix, SAS query, endpoint from the URL or "") of an az:// or https:// blob URI."""
    parts = urllib.parse.urlsplit(uri)
    sas = parts.query
    if parts.scheme == "az":
        account, rest, endpoint = parts.netloc, parts.path.lstrip("/"), ""
    else:
        host = parts.hostname or ""
        match = AZURE_HOST.match(host)
        account, rest = (match.group(1).lower() if match else ""), parts.path.lstrip("/")
        endpoint = f"https://{host}" + (f":{parts.port}" if parts.port else "")
    container, _, prefix = urllib.parse.unquote(rest).partition("/")
    if not ACCOUNT_NAME.match(account) or not container:
        raise UsageError(f"--source {_without_query(uri)!r} is not an Azure blob URI; use "
                         "az://account/container/prefix or https://account.blob.core.windows.net/container/prefix")
    return account, container, prefix.strip("/"), sas, endpoint


def _without_query(uri: str) -> str:
    return uri.split("?", 1)[0]


@dataclass
class AzureSource:
    """A container and prefix of one storage account; each file's locator is its blob name."""

    account: str
    container: str
    prefix: str
    sas: str = field(default="", repr=False)  # from --source; never part of `uri`, which manifests record
    endpoint: str = ""  # the https:// URI's own host, else resolved from the environment
    transfer: TransferConfig = DEFAULTS
    kind: str = "az"
    default_ref: str | None = None
    features: ClassVar[Features] = Features(promises=frozenset({"md5"}))
    _api: BlobApi | None = field(default=None, repr=False)
    _api_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS) -> AzureSource:
        account, container, prefix, sas, endpoint = _parse_uri(uri)
        return cls(account=account, container=container, prefix=prefix, sas=sas, endpoint=endpoint,
                   transfer=transfer)

    @property
    def uri(self) -> str:
        return f"az://{self.account}/{self.container}/{self.prefix}"

    @property
    def default_name(self) -> str:
        return slugify("az", self.account, self.container, self.prefix)

    @property
    def api(self) -> BlobApi:
        """The Blob calls, built on first use: endpoint and credentials come from the environment then."""
        with self._api_lock:
            if self._api is None:
                settings = Settings.resolve(self.account, self.sas, self.endpoint)
                self._api = BlobApi(settings, self.transfer.connect_timeout, self.transfer.stall_timeout,
                                    self.transfer.concurrency + 4)
            return self._api

    def pinned_revision(self, revision: str | None) -> str | None:
        return pinned_listing_digest(revision, "Azure")

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        return listed_snapshot(self._list(), selection, f"blobs under {self.uri}", "check the container and prefix")

    def _list(self) -> list[RemoteFile]:
        list_prefix = f"{self.prefix}/" if self.prefix else ""
        files: list[RemoteFile] = []
        with self._errors(f"listing {self.uri}"):
            for blob in self.api.list_blobs(self.container, list_prefix):
                if blob.name.endswith("/") or blob.is_folder:
                    continue  # a directory marker, not a file
                files.append(self._remote_file(blob.name, blob.name[len(list_prefix):], blob.size, blob.etag,
                                               blob.content_md5))
            if not files and self.prefix:  # az://account/container/path/model.gguf: one blob, not a prefix
                head = self._properties(self.prefix)
                if head is not None and head.get("x-ms-meta-hdi_isfolder", "").lower() != "true":
                    files.append(self._remote_file(self.prefix, self.prefix.rsplit("/", 1)[-1],
                                                   int(head.get("content-length") or 0), head.get("etag", ""),
                                                   head.get("content-md5", "")))
        return files

    def _properties(self, name: str) -> dict[str, str] | None:
        try:
            return self.api.blob_properties(self.container, name)
        except AzureError as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def _remote_file(name: str, path: str, size: int, etag: str, content_md5: str) -> RemoteFile:
        md5 = from_base64("md5", content_md5, "Content-MD5") if content_md5 else None
        promises = (md5,) if md5 is not None and len(md5.value) == 32 else ()
        return RemoteFile(path=path, size=size, promises=promises, etag=etag.strip('"'), locator=name)

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file  # the listing has every property a blob promises (Content-MD5)

    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged Get Blob pinned to the listed ETag: a blob rewritten since the listing is a 412."""
        from weightsync.sources.connections import RangeBody

        what = f"downloading az://{self.account}/{self.container}/{file.locator}"
        with self._errors(what):
            body = self.api.get_blob(self.container, file.locator, start, end, file.etag or "")
        return RangeBody(body, what)

    def _errors(self, what: str) -> _AzureErrorMapper:
        return _AzureErrorMapper(what, self)


class _AzureErrorMapper(ErrorTranslator):
    """Translate Blob service replies, credential and connection errors into weightsync's exit-code classes."""

    def __init__(self, what: str, source: AzureSource) -> None:
        super().__init__(what)
        self.source = source

    def translate(self, exc: BaseException) -> Exception | None:
        import http.client
        import ssl

        what, source = self.what, self.source
        if isinstance(exc, AzureError):
            code, status = exc.code, exc.status
            if code == "ContainerNotFound" or (status == 404 and code not in NOT_FOUND):
                return SourceError(f"{what}: container {source.container!r} not found in storage account "
                                   f"{source.account!r} ({code}); check --source")
            if code in NOT_FOUND or status == 404:
                return SourceError(f"{what}: blob not found ({code}); check --source")
            if status in (401, 403):
                origin = source.api.settings.auth.origin
                return SourceError(f"{what}: access denied ({code}) with {origin}; check that credential and its "
                                   "permissions (read and list) on the container")
            if status == 412 or code == "ConditionNotMet":
                return IntegrityError(f"{what}: the blob changed at the source during the sync; rerun to sync the "
                                      "new revision")
            if code in THROTTLED or status >= 500 or status == 429:
                return TransientError(f"{what}: {code} (HTTP {status})",
                                      retry_after(exc.headers.get("retry-after", "")))
            return SourceError(f"{what}: {code}: {exc.message}")
        if isinstance(exc, ssl.SSLCertVerificationError):
            return SourceError(f"{what}: the server's TLS certificate is not trusted ({exc.verify_message}); for a "
                               "private CA set REQUESTS_CA_BUNDLE to its PEM file, as for the az CLI")
        if isinstance(exc, (OSError, http.client.HTTPException)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}")
        return _identity_error(what, exc)


def _identity_error(what: str, exc: BaseException) -> Exception | None:
    """azure-identity's failures: no credential found or a token refused is exit 3, a network failure a retry."""
    module = type(exc).__module__
    if not module.startswith(("azure.core", "azure.identity")):
        return None
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if type(exc).__name__ in ("ServiceRequestError", "ServiceResponseError"):
        return TransientError(f"{what}: getting a token from DefaultAzureCredential: {first_line}")
    return SourceError(f"{what}: no Azure credentials: DefaultAzureCredential found none that works ({first_line}); "
                       "set AZURE_STORAGE_SAS_TOKEN, AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_KEY, or give the "
                       "pod a workload or managed identity")
