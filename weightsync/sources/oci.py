"""OCI registry source: `oci://registry/repo[:tag]` or `oci://registry/repo@sha256:<hex>`.

Models shipped as OCI artifacts (ORAS, CNCF ModelPack) in any registry that speaks the OCI distribution API
(Harbor, ECR, GHCR, Docker Hub, CNCF distribution). One manifest GET resolves the tag to the manifest's digest,
which weightsync computes itself over the exact bytes (and checks against `Docker-Content-Digest` and any pinned
digest); that digest, in hex, is the revision. Each layer is one file, named by its
`org.opencontainers.image.title` (or ModelPack's `org.cncf.model.filepath`) annotation, an untrusted path checked
as every source's is, and promised by its own sha256 digest: the strongest promise a source makes. Blobs are
ranged GETs over the sources' own connections (connections.py), following a registry's redirect to its storage
(S3, a CDN) with the credentials sent to the registry's host only.

Only layers that are a file as they are pushed are accepted (ORAS's file layers, ModelPack `*.raw`,
`application/octet-stream`, any other titled blob that is no archive); tar, tar+gzip, tar+zstd layers (ORAS
directories, ModelPack `*.tar*`, KitOps ModelKit layers, image layers) would need unpacking, which weightsync does
not do: they are refused by name, never written as they are. An image index is followed only when it lists one
manifest; with several, weightsync picks none and says which digests to pin.

Credentials, as docker and podman read them: the registry's Bearer challenge (a token from its realm, anonymous or
with the user's credentials, cached for its `expires_in`) or Basic challenge, with credentials from
`$REGISTRY_AUTH_FILE` or `$XDG_RUNTIME_DIR/containers/auth.json` (podman), then `$DOCKER_CONFIG/config.json` or
`~/.docker/config.json` (`credHelpers`, `credsStore` through `docker-credential-<name> get`, `auths.<host>.auth`,
`identitytoken`). Registries speak https, except localhost / 127.0.0.1 / ::1 (as docker treats them) and
`oci+http://` URIs, for registries a user explicitly reaches over plain http.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import SplitResult, quote, urlencode, urljoin, urlsplit

from weightsync import __version__
from weightsync.checksums import Promise
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.layout import check_relative_path
from weightsync.sources import TRANSIENT_STATUS, Features, RemoteFile, Selection, Snapshot, retry_after, slugify

if TYPE_CHECKING:
    from weightsync.sources.connections import Body, Pool, RangeBody

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
TITLE = "org.opencontainers.image.title"
MODELPACK_FILEPATH = "org.cncf.model.filepath"  # modelpack/model-spec docs/annotations.md
ORAS_UNPACK = "io.deis.oras.content.unpack"  # ORAS marks a directory pushed as a tar+gzip to be unpacked
ORAS_FILE = "application/vnd.oci.image.layer.v1.tar"  # ORAS's default mediaType for a *file*, stored as it is
DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
# The distribution spec's grammar: a repository path of lowercase components, a tag of at most 128 characters.
REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
REGISTRY = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")
# What would need unpacking: archives and compressed streams (ModelPack *.tar*, ORAS directories, image layers).
ARCHIVE = re.compile(r"(?:[.+/-]tar\b|gzip|zstd|\bxz\b|bzip2|\bzip\b)")
ARCHIVE_PREFIXES = ("application/vnd.kitops.",  # KitOps ModelKit layers: tar or tar+gzip of a directory
                    "application/vnd.docker.image.rootfs.")
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit on a manifest it accepts
MAX_REDIRECTS = 5
LOOPBACK = ("localhost", "127.0.0.1", "::1")
DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
USER_AGENT = f"weightsync/{__version__}"
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Credentials:
    """What the user's auth files hold for one registry, and where it came from (never the values in a message)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""
    origin: str = ""


def parse_reference(uri: str) -> tuple[str, str, str, str | None, str | None]:
    """(scheme, registry, repository, tag, digest hex) of an oci:// or oci+http:// URI."""
    scheme = "http" if uri.startswith("oci+http://") else "https"
    rest = uri.split("://", 1)[1].rstrip("/")
    registry, _, path = rest.partition("/")
    if "@" in registry:  # not echoed: it would be a password in the logs
        raise UsageError("--source has credentials in its oci:// URI; put them in docker's config.json (docker "
                         "login) or podman's auth.json, never in the URI")
    digest = tag = None
    if "@" in path:
        path, _, pinned = path.partition("@")
        found = DIGEST.match(pinned)
        if not found:
            raise UsageError(f"--source {uri!r}: @{pinned} is not a sha256 digest; use @sha256:<64 hex digits>")
        digest = found.group(1)
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not TAG.match(tag):
            raise UsageError(f"--source {uri!r}: {tag!r} is not a valid tag")
    if registry in DOCKER_HUB and "/" not in path:
        path = f"library/{path}"  # docker's rule for official images: `ubuntu` is `library/ubuntu`
    if not REGISTRY.match(registry):
        raise UsageError(f"--source {uri!r}: {registry!r} is not a registry host[:port]")
    if not REPOSITORY.match(path):
        raise UsageError(f"--source {uri!r} is not an OCI reference; use oci://registry/repository[:tag] or "
                         "oci://registry/repository@sha256:<digest>, the repository in lowercase and the registry "
                         "always named (docker.io, ghcr.io, ...)")
    if _hostname(registry) in LOOPBACK:
        scheme = "http"
    return scheme, registry, path, tag, digest


@dataclass
class OciSource:
    """One repository of an OCI registry; each file's locator is its blob URL (plus its title, so that two
    files of the same content stay two)."""

    scheme: str
    registry: str
    repository: str
    uri_tag: str | None = None
    uri_digest: str | None = None
    transfer: TransferConfig = DEFAULTS
    kind: str = "oci"
    features: ClassVar[Features] = Features(promises=frozenset({"sha256"}), refs=True)
    _connections: Pool | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _authorization: str | None = field(default=None, repr=False)
    _authorization_expires: float = field(default=float("inf"), repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS) -> OciSource:
        scheme, registry, repository, tag, digest = parse_reference(uri)
        return cls(scheme=scheme, registry=registry, repository=repository, uri_tag=tag, uri_digest=digest,
                   transfer=transfer)

    @property
    def uri(self) -> str:
        return f"{'oci+http' if self.scheme == 'http' and not self._loopback else 'oci'}://{self.registry}/" \
               f"{self.repository}"

    @property
    def default_name(self) -> str:
        return slugify("oci", self.registry, self.repository)

    @property
    def default_ref(self) -> str:
        return self.uri_tag or "latest"

    @property
    def _loopback(self) -> bool:
        return _hostname(self.registry) in LOOPBACK

    @property
    def api_host(self) -> str:
        """The host (and port) the API lives on: Docker Hub's is registry-1.docker.io."""
        return "registry-1.docker.io" if self.registry in DOCKER_HUB else self.registry

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.api_host}/v2/{self.repository}"

    def pinned_revision(self, revision: str | None) -> str | None:
        if revision:
            wanted = self._digest_of(revision)
            given = self.uri_digest or self.uri_tag
            if given and (wanted or revision) != given:
                raise UsageError(f"--revision {revision} and the reference in --source {self.uri} "
                                 f"({self.uri_tag or 'sha256:' + str(self.uri_digest)}) name two revisions; give "
                                 "one of them")
            if not wanted and not TAG.match(revision):
                raise UsageError(f"--revision {revision!r} is neither a tag nor a sha256:<hex> digest")
            return wanted
        return self.uri_digest

    @staticmethod
    def _digest_of(revision: str) -> str | None:
        found = DIGEST.match(revision)
        if found:
            return found.group(1)
        return revision if HEX64.match(revision) else None

    # -- listing -----------------------------------------------------------------------------------------------
    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        digest = self._digest_of(revision) if revision else self.uri_digest
        ref = f"sha256:{digest}" if digest else (revision or self.default_ref)
        if not digest and not TAG.match(ref):
            raise UsageError(f"--revision {ref!r} is neither a tag nor a sha256:<hex> digest")
        where = f"{self.uri}{'@' if digest else ':'}{ref}"
        manifest, revision_id, media_type = self._manifest(ref, digest, where)
        if media_type in (OCI_INDEX, DOCKER_LIST):
            manifest = self._single_manifest(manifest, where)
        files = self._files(manifest, where, selection)
        if not files:
            raise SourceError(f"{where} has no files" + (" matching --include/--exclude" if selection.key() else ""))
        return Snapshot(revision=revision_id, files=tuple(files), ref=None if digest else ref)

    def _manifest(self, ref: str, digest: str | None, where: str) -> tuple[dict[str, Any], str, str]:
        """The manifest `ref` names, its digest (hex, computed here over the bytes) and its mediaType."""
        import hashlib
        import json

        what = f"resolving {where}"
        body = self._get(f"{self.base}/manifests/{ref}", {"Accept": ACCEPT}, what)
        if body.status != 200:
            raise self._status(body, what, "manifest")
        data = self._read_small(body, what)
        actual = hashlib.sha256(data).hexdigest()
        announced = body.headers.get("docker-content-digest", "")
        if announced and announced != f"sha256:{actual}":
            raise IntegrityError(f"{what}: the manifest's bytes hash to sha256:{actual}, the registry says "
                                 f"{announced}; refusing it")
        if digest and actual != digest:
            raise IntegrityError(f"{what}: the registry returned a manifest whose digest is sha256:{actual}, not "
                                 "the pinned one; refusing it")
        try:
            manifest = json.loads(data)
        except ValueError as exc:
            raise SourceError(f"{what}: the manifest is not JSON") from exc
        if not isinstance(manifest, dict):
            raise SourceError(f"{what}: the manifest is not a JSON object")
        media_type = str(manifest.get("mediaType") or body.headers.get("content-type", "").split(";")[0].strip())
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST):
            raise SourceError(f"{what}: unsupported manifest type {media_type!r}; weightsync reads OCI image "
                              "manifests (and Docker v2 ones)")
        return manifest, actual, media_type

    def _single_manifest(self, index: dict[str, Any], where: str) -> dict[str, Any]:
        """The one manifest an index lists; with several, which one holds the model is the user's to say."""
        entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)]
        digests = [str(e.get("digest", "")) for e in entries]
        if len(entries) != 1 or not DIGEST.match(digests[0]):
            listed = ", ".join(digests[:4]) + (", ..." if len(digests) > 4 else "")
            raise SourceError(f"{where} is an image index of {len(entries)} manifests ({listed or 'none'}); "
                              "weightsync picks none of them: pin the one that holds the model with "
                              f"oci://{self.registry}/{self.repository}@sha256:<digest>")
        manifest, _, media_type = self._manifest(digests[0], digests[0][len("sha256:"):], f"{where} -> {digests[0]}")
        if media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            raise SourceError(f"{where}: an index inside an index is not supported; pin a manifest by digest")
        return manifest

    def _files(self, manifest: dict[str, Any], where: str, selection: Selection) -> list[RemoteFile]:
        layers = manifest.get("layers")
        if not isinstance(layers, list):
            raise SourceError(f"{where}: the manifest lists no layers")
        files: list[RemoteFile] = []
        seen: set[str] = set()
        for layer in layers:
            if not isinstance(layer, dict):
                raise SourceError(f"{where}: a layer descriptor is not a JSON object")
            annotations = layer.get("annotations") if isinstance(layer.get("annotations"), dict) else {}
            media_type = str(layer.get("mediaType", ""))
            digest, size = str(layer.get("digest", "")), layer.get("size")
            path = annotations.get(TITLE) or annotations.get(MODELPACK_FILEPATH)
            if not isinstance(path, str) or not path:
                raise SourceError(f"{where}: layer {digest} ({media_type}) has no {TITLE} annotation, so it names "
                                  "no file; weightsync syncs file artifacts (oras push, ModelPack), not images")
            if path in seen:
                raise IntegrityError(f"refusing listing from {where}: two layers are both titled {path!r}")
            seen.add(path)
            if not selection.matches(path):
                continue
            check_relative_path(path, where)
            problem = _unpacking_needed(media_type, annotations)
            if problem:
                raise SourceError(f"{where}: layer {path!r} is {problem}; weightsync syncs each layer as the file "
                                  "it is and does not unpack archives: push the files themselves (oras push, one "
                                  "file per layer; ModelPack *.raw), or --exclude it")
            found = DIGEST.match(digest)
            if not found:
                raise SourceError(f"{where}: layer {path!r} has digest {digest!r}; weightsync verifies sha256 "
                                  "digests only")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise SourceError(f"{where}: layer {path!r} has no valid size")
            hex_digest = found.group(1)
            files.append(RemoteFile(path=path, size=size, etag=hex_digest,
                                    promises=(Promise("sha256", hex_digest, "layer digest"),),
                                    locator=f"{self.base}/blobs/sha256:{hex_digest}#{quote(path)}"))
        return files

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    # -- reading -----------------------------------------------------------------------------------------------
    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged GET of the blob, following the registry's redirect to its storage, read from the socket."""
        from weightsync.sources.connections import RangeBody

        what = f"downloading {self.uri}/{file.path}"
        url = file.locator.split("#", 1)[0]
        body = self._get(url, {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}, what)
        status = body.status
        if status != 206 and not (status == 200 and start == 0 and end == file.size):
            if status == 200:
                body.close()
                raise IntegrityError(f"{what}: the registry ignored the byte range; cannot resume safely")
            raise self._status(body, what, "blob")
        if status == 206 and not body.headers.get("content-range", "").startswith(f"bytes {start}-{end - 1}/"):
            body.close()
            raise TransientError(f"{what}: unexpected Content-Range {body.headers.get('content-range')!r}")
        return RangeBody(body, what)

    # -- HTTP and auth -----------------------------------------------------------------------------------------
    def _get(self, url: str, extra: dict[str, str], what: str) -> Body:
        """GET `url` with the registry's credentials (answering its challenge once), following redirects; the
        credentials go to the registry's host only, never to the storage it redirects to."""
        body = self._send(url, extra, what)
        if body.status == 401 and body.headers.get("www-authenticate"):
            challenge = body.headers["www-authenticate"]
            body.read_all()
            self._authenticate(challenge, what)
            body = self._send(url, extra, what)
        return body

    def _send(self, url: str, extra: dict[str, str], what: str) -> Body:
        import http.client

        try:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                headers = {"Host": parts.netloc, "User-Agent": USER_AGENT, **extra}
                if parts.netloc == self.api_host:
                    authorization = self._current_authorization()
                    if authorization:
                        headers["Authorization"] = authorization
                body = self._request(parts, "GET", headers)
                if body.status not in (301, 302, 303, 307, 308):
                    return body
                body.read_all()
                url = urljoin(url, body.headers.get("location", ""))
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _request(self, parts: SplitResult, method: str, headers: dict[str, str], data: bytes | None = None) -> Body:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return self._pool.send(parts.scheme, parts.hostname or "", port, method, target, headers, data)

    def _current_authorization(self) -> str | None:
        with self._lock:
            if self._authorization and time.monotonic() >= self._authorization_expires:
                self._authorization = None
            return self._authorization

    def _authenticate(self, challenge: str, what: str) -> None:
        """Answer a `WWW-Authenticate` challenge: Basic with the stored credentials, or Bearer with a token from
        the realm (anonymous, or with the credentials); the result is used until the token expires."""
        import base64

        credentials = registry_credentials(self.registry)
        scheme, _, rest = challenge.partition(" ")
        params = dict(CHALLENGE_PARAM.findall(rest))
        if scheme.lower() == "basic":
            if not credentials.username:
                raise SourceError(f"{what}: the registry asks for a login (HTTP 401) and no credentials for "
                                  f"{self.registry} were found ({credential_sources()}); run `docker login "
                                  f"{self.registry}` or `oras login`")
            pair = f"{credentials.username}:{credentials.password}".encode()
            with self._lock:
                self._authorization = "Basic " + base64.b64encode(pair).decode()
                self._authorization_expires = float("inf")
            return
        if scheme.lower() != "bearer" or not params.get("realm"):
            raise SourceError(f"{what}: unsupported authentication challenge {scheme!r} from the registry")
        token, lifetime = self._fetch_token(params, credentials, what)
        with self._lock:
            self._authorization = f"Bearer {token}"
            self._authorization_expires = time.monotonic() + max(lifetime - 10, lifetime / 2)

    def _fetch_token(self, params: dict[str, str], credentials: Credentials, what: str) -> tuple[str, float]:
        """A registry token from the challenge's realm: GET with Basic credentials, or the OAuth2 refresh-token
        POST docker makes with an identity token."""
        import base64
        import http.client
        import json

        scope = params.get("scope") or f"repository:{self.repository}:pull"
        query = {k: v for k, v in (("service", params.get("service", "")), ("scope", scope)) if v}
        realm = urlsplit(params["realm"])
        if realm.scheme not in ("http", "https") or not realm.hostname:
            raise SourceError(f"{what}: the registry's token realm {params['realm']!r} is not an http(s) URL")
        if realm.scheme == "http" and self.scheme == "https" and (credentials.username or credentials.identity_token):
            raise SourceError(f"{what}: the https registry sends logins to a plain-http token realm ({realm.netloc});"
                              " weightsync does not send credentials over plain http")
        headers = {"Host": realm.netloc, "User-Agent": USER_AGENT}
        method, data = "GET", None
        if credentials.identity_token:
            method = "POST"
            data = urlencode({**query, "grant_type": "refresh_token", "client_id": "weightsync",
                              "refresh_token": credentials.identity_token}).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif credentials.username:
            pair = f"{credentials.username}:{credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        own = realm.query + ("&" if realm.query else "") + urlencode(query) if method == "GET" else realm.query
        target = realm._replace(query=own)
        try:
            body = self._request(target, method, headers, data)
            reply = body.read_all()
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: token request: {type(exc).__name__}: {exc}") from exc
        if body.status in TRANSIENT_STATUS:
            raise TransientError(f"{what}: token request: HTTP {body.status}",
                                 retry_after(body.headers.get("retry-after", "")))
        if body.status != 200:
            raise SourceError(f"{what}: the registry's token service refused {self._whose(credentials)} (HTTP "
                              f"{body.status}); check the credentials for {self.registry} ({credential_sources()})")
        try:
            answer = json.loads(reply)
            token = answer.get("token") or answer.get("access_token")
            lifetime = float(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise SourceError(f"{what}: the registry's token service sent no token") from exc
        if not isinstance(token, str) or not token:
            raise SourceError(f"{what}: the registry's token service sent no token")
        return token, lifetime

    @staticmethod
    def _whose(credentials: Credentials) -> str:
        return f"the credentials from {credentials.origin}" if credentials.origin else "an anonymous request"

    def _status(self, body: Body, what: str, kind: str) -> Exception:
        """The error an unexpected reply means, by status and the registry's error code; the body is dropped."""
        import json

        status, headers = body.status, body.headers
        codes: list[str] = []
        try:
            errors = json.loads(body.read_all()[:65536]).get("errors") or []
            codes = [str(e.get("code", "")) for e in errors if isinstance(e, dict)]
        except (ValueError, AttributeError, OSError, TypeError):
            body.close()
        if status in TRANSIENT_STATUS or "TOOMANYREQUESTS" in codes:
            return TransientError(f"{what}: HTTP {status} {' '.join(codes)}".rstrip(),
                                  retry_after(headers.get("retry-after", "")))
        if status in (401, 403) or "UNAUTHORIZED" in codes or "DENIED" in codes:
            credentials = registry_credentials(self.registry)
            return SourceError(f"{what}: access denied (HTTP {status} {' '.join(codes)}) for "
                               f"{self._whose(credentials)}; the repository may not exist, or the credentials for "
                               f"{self.registry} are wrong or lack pull access ({credential_sources()})")
        if "NAME_UNKNOWN" in codes:
            return SourceError(f"{what}: repository {self.repository} not found on {self.registry} (NAME_UNKNOWN)")
        if "MANIFEST_UNKNOWN" in codes or (status == 404 and kind == "manifest"):
            return SourceError(f"{what}: tag or digest not found in {self.repository} (MANIFEST_UNKNOWN); check "
                               "the tag or --revision")
        if "BLOB_UNKNOWN" in codes or status == 404:
            return SourceError(f"{what}: the blob is not in the registry (HTTP {status} {' '.join(codes)})".rstrip())
        return SourceError(f"{what}: HTTP {status} {' '.join(codes)}".rstrip())

    @staticmethod
    def _read_small(body: Body, what: str) -> bytes:
        length = body.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
            body.close()
            raise SourceError(f"{what}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            return body.read_all()
        except OSError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc

    @property
    def _pool(self) -> Pool:
        from weightsync.sources.connections import Pool

        with self._lock:
            if self._connections is None:
                self._connections = Pool(self.transfer.connect_timeout, self.transfer.stall_timeout,
                                         self.transfer.concurrency + 4)
            return self._connections


def _hostname(registry: str) -> str:
    """`localhost` of `localhost:5000`, `::1` of `[::1]:5000`."""
    return urlsplit(f"//{registry}").hostname or ""


def _unpacking_needed(media_type: str, annotations: dict[str, Any]) -> str | None:
    """Why a layer is no file as it is (an archive to unpack), or None for a file."""
    if str(annotations.get(ORAS_UNPACK, "")).lower() == "true":
        return f"a directory ORAS packed as {media_type!r} (annotation {ORAS_UNPACK})"
    if media_type == ORAS_FILE:
        return None  # ORAS's default for a file pushed as it is: `oras pull` writes these bytes unchanged
    if media_type.startswith(ARCHIVE_PREFIXES) or ARCHIVE.search(media_type):
        return f"an archive ({media_type})"
    return None



# -- credentials -------------------------------------------------------------------------------------------------
def auth_files() -> list[str]:
    """The auth files podman and docker read, in the order weightsync tries them."""
    env = os.environ
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(env["REGISTRY_AUTH_FILE"])
    elif env.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    docker = env.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(os.path.join(docker, "config.json"))
    return files


def credential_sources() -> str:
    """Where credentials are read from, for an error message: the files, never their contents."""
    return "credentials are read from " + ", ".join(auth_files())


def _host_of(key: str) -> str:
    """An auths key (`https://index.docker.io/v1/`, `ghcr.io`, `localhost:5000`) as a bare host[:port]."""
    return key.split("://", 1)[-1].split("/", 1)[0]


def registry_credentials(registry: str) -> Credentials:
    """The credentials docker or podman would use for `registry`, or empty ones (anonymous)."""
    import json

    names = set(DOCKER_HUB) if registry in DOCKER_HUB else {registry}
    for path in auth_files():
        try:
            with open(path) as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        helpers = config.get("credHelpers") if isinstance(config.get("credHelpers"), dict) else {}
        own = next((helpers[key] for key in helpers if _host_of(key) in names), None)
        for helper, required in ((own, True), (config.get("credsStore"), False)):
            if isinstance(helper, str) and helper:
                found = _from_helper(helper, registry, path, required)
                if found:
                    return found
                break  # docker asks one helper: the registry's own, else the store
        auths = config.get("auths") if isinstance(config.get("auths"), dict) else {}
        for key, entry in auths.items():
            if _host_of(key) in names and isinstance(entry, dict):
                found = _from_entry(entry, f"{path} (auths.{key})")
                if found:
                    return found
    return Credentials()


def _from_entry(entry: dict[str, Any], origin: str) -> Credentials | None:
    import base64
    import binascii

    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        return Credentials(identity_token=entry["identitytoken"], origin=origin)
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise SourceError(f"the auth entry in {origin} is not base64 user:password") from exc
        return Credentials(username=username, password=password, origin=origin)
    if isinstance(entry.get("username"), str) and entry["username"]:  # podman may store them apart
        return Credentials(username=entry["username"], password=str(entry.get("password", "")), origin=origin)
    return None


def _from_helper(helper: str, registry: str, path: str, required: bool) -> Credentials | None:
    """`docker-credential-<helper> get`, as docker runs it: the server on stdin, JSON on stdout. A missing
    `credsStore` program (a Docker Desktop config mounted in a pod) means no credentials; a missing helper named
    for this registry is an error."""
    import json
    import subprocess

    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise SourceError(f"{path} names the credential helper {helper!r}, which is not a program name")
    program = f"docker-credential-{helper}"
    server = "https://index.docker.io/v1/" if registry in DOCKER_HUB else registry
    try:
        done = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        if not required:
            return None
        raise SourceError(f"{path} names the credential helper {program} for {registry}, which is not on "
                          "PATH") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"the credential helper {program} failed: {type(exc).__name__}") from exc
    if done.returncode != 0:
        return None  # "credentials not found in native keychain": anonymous, or the next file
    try:
        answer = json.loads(done.stdout)
        username, secret = str(answer.get("Username", "")), str(answer.get("Secret", ""))
    except (ValueError, AttributeError) as exc:
        raise SourceError(f"the credential helper {program} printed no JSON credentials") from exc
    origin = f"{program} (named in {path})"
    if username == "<token>":
        return Credentials(identity_token=secret, origin=origin)
    return Credentials(username=username, password=secret, origin=origin) if username or secret else None
