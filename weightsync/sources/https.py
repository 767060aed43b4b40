"""Plain HTTP(S) source: one file (`https://host/path/model.safetensors[#sha256=HEX]`), or the set of files a
lockfile names under a base URL (`https://host/models/tiny/` with `--lockfile tiny.lock`).

A web server cannot list a directory, so a base URL needs a lockfile (weightsync's own format, lockfile.py):
its paths are relative to the base URL, and its sha256s pin the content. What can vouch for the bytes, in the
order a user trusts it: the `#sha256=` fragment of the URL (as pip reads it), the lockfile's sha256, and a
`Repr-Digest: sha-256=:…:` (RFC 9530) or `Digest: SHA-256=…` (RFC 3230) header of the HEAD; with none of them a
file is checked by its size only, and says so. Two of them that disagree refuse the sync before a byte moves.

With a fragment or a lockfile the revision is derived from the sha256s, so a pinned warm start makes no request;
otherwise it is a digest of (url, size, ETag or Last-Modified) from a HEAD. Reads are `Range` GETs pinned by
`If-Range` to the listed strong ETag (or Last-Modified): a 200 to a ranged request, or a reply whose ETag is not
the listed one, means the file changed, and is exit 4, never a file spliced from two versions.

The bearer token (WEIGHTSYNC_HTTP_TOKEN) goes to the source URL's own origin only, never across a redirect to
another host (a presigned CDN URL carries its own signature). A URL's query string (a presigned signature) is
used for requests but never shown: `uri`, every message and the manifest carry the URL without it. TLS trusts
the system's CAs, or SSL_CERT_FILE instead of the system's file (OpenSSL reads it), plus REQUESTS_CA_BUNDLE.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit

from weightsync import __version__
from weightsync.checksums import HEX, Promise
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import (
    LISTING_DIGEST,
    TRANSIENT_STATUS,
    Features,
    RemoteFile,
    Selection,
    Snapshot,
    listing_digest,
    retry_after,
    slugify,
)

if TYPE_CHECKING:
    from weightsync.sources import PinnedFiles
    from weightsync.sources.connections import Body, Pool, RangeBody

TOKEN_ENV = "WEIGHTSYNC_HTTP_TOKEN"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
MAX_REDIRECTS = 5
USER_AGENT = f"weightsync/{__version__}"
FRAGMENT = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
REPR_DIGEST = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]+):", re.IGNORECASE)  # RFC 9530
LEGACY_DIGEST = re.compile(r"(?:^|,)\s*sha-256\s*=\s*([A-Za-z0-9+/=]+)", re.IGNORECASE)  # RFC 3230


def http_token() -> str | None:
    return (os.environ.get(TOKEN_ENV) or "").strip() or None


def content_revision(entries: list[tuple[str, str]]) -> str:
    """The revision of files whose sha256s are known ahead (fragment, lockfile): the same for the same content,
    whichever way it was pinned, and computed without a request."""
    return listing_digest([(path, 0, f"sha256:{sha256}") for path, sha256 in entries])


@dataclass
class HttpsSource:
    """One URL or a lockfile's files under a base URL; each file's locator is its full URL (query included)."""

    url: str  # as given, query included: what requests go to
    lockfile: PinnedFiles | None = None
    transfer: TransferConfig = DEFAULTS
    kind: str = "https"
    default_ref: str | None = None
    features: ClassVar[Features] = Features(promises=frozenset({"sha256"}))
    _connections: Pool | None = field(default=None, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS, *,
                 lockfile: PinnedFiles | None = None) -> HttpsSource:
        parts = urlsplit(uri)
        shown = _without_query(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--source {shown!r} is not an http(s) URL; use https://host/path/file or "
                             "https://host/path/ with --lockfile")
        if parts.username or parts.password:
            raise UsageError(f"--source {parts.scheme}://{parts.hostname}/...: credentials in the URL are not "
                             f"accepted (they would be logged); set {TOKEN_ENV} to a bearer token instead")
        if parts.fragment and not FRAGMENT.match(parts.fragment):
            raise UsageError(f"--source {shown!r}: the URL fragment must be #sha256=<64 hex digits>")
        if parts.fragment and (parts.path.endswith("/") or not parts.path.strip("/")):
            raise UsageError(f"--source {shown!r}: #sha256= pins one file; a base URL ending in '/' takes "
                             "its files and their sha256s from --lockfile")
        return cls(url=uri, lockfile=lockfile, transfer=transfer)

    def _require_lockfile(self) -> None:
        """A base URL names a folder, which a web server cannot list: without a lockfile there is nothing to
        sync (a revision already on the volume can still be served, verified or pinned)."""
        if self.is_set and self.lockfile is None:
            raise UsageError(f"--source {self.uri!r} names a folder, and a web server cannot list one: give "
                             "--lockfile FILE listing its files (make one with `weightsync lock --source "
                             "<local copy> > FILE`, then `weightsync lock --source URL --lockfile FILE`), or "
                             "name one file")

    # -- identity ------------------------------------------------------------------
    @property
    def _parts(self) -> SplitResult:
        return urlsplit(self.url)

    @property
    def is_set(self) -> bool:
        """A base URL whose files the lockfile names (else: one file, the URL itself)."""
        return self._parts.path.endswith("/") or not self._parts.path.strip("/")

    @property
    def uri(self) -> str:
        """The URL without its query string (a presigned signature must never be shown or recorded)."""
        return _without_query(self.url)

    @property
    def default_name(self) -> str:
        parts = self._parts
        return slugify(parts.scheme, parts.netloc.replace(":", "-"), unquote(parts.path))

    @property
    def _fragment_sha256(self) -> str | None:
        found = FRAGMENT.match(self._parts.fragment)
        return found[1].lower() if found else None

    @property
    def _name(self) -> str:
        return unquote(self._parts.path.rstrip("/").rsplit("/", 1)[-1])

    def _pinned_content(self) -> str | None:
        """The content-derived revision, when every sha256 is known without a request."""
        if self.lockfile is not None:
            return content_revision([(f.path, f.sha256) for f in self.lockfile.files])
        fragment = self._fragment_sha256
        return content_revision([(self._name, fragment)]) if fragment else None

    def pinned_revision(self, revision: str | None) -> str | None:
        pinned = self._pinned_content()
        if pinned:
            allowed = {pinned, self.lockfile.revision if self.lockfile else pinned}
            if revision and revision not in allowed:
                pin = f"--lockfile {self.lockfile.origin}" if self.lockfile else "the #sha256= of the URL"
                raise UsageError(f"--revision {revision} differs from the content {pin} pins (revision {pinned}); "
                                 "drop --revision")
            return pinned
        if revision and not LISTING_DIGEST.match(revision):
            raise UsageError(f"--revision {revision!r} is not a weightsync revision id for a URL (20 hex "
                             "characters, as printed by a previous sync); leave it unset, or pin the content "
                             "with #sha256= or --lockfile")
        if not revision:
            self._require_lockfile()
        return revision or None

    # -- listing -------------------------------------------------------------------
    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        """A HEAD per file: its size, its identity (ETag, Last-Modified) and any digest header."""
        self._require_lockfile()
        locked = {f.path: f.sha256 for f in self.lockfile.files} if self.lockfile else {}
        if self.is_set:
            wanted = [(path, sha256) for path, sha256 in locked.items() if selection.matches(path)]
        else:
            pin = self._fragment_sha256 or locked.get(self._name)
            wanted = [(self._name, pin)] if selection.matches(self._name) else []
        if not wanted:
            raise SourceError(f"{self.uri} has no files" + (" matching --include/--exclude" if selection.key()
                                                             else ""))
        if len(wanted) == 1:
            files = [self._head(*wanted[0])]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(self.transfer.concurrency, len(wanted))) as pool:
                files = list(pool.map(lambda item: self._head(*item), wanted))
        pinned = self._pinned_content()
        listed = pinned or listing_digest([(self._shown(f.locator), f.size, f.etag or "") for f in files])
        return Snapshot(revision=listed, files=tuple(files))

    def _locator(self, path: str) -> str:
        if not self.is_set:
            return self.url.split("#", 1)[0]
        base = self.url.split("#", 1)[0]
        query = ""
        if "?" in base:
            base, query = base.split("?", 1)
        return base + quote(path) + (f"?{query}" if query else "")

    def _head(self, path: str, pinned_sha256: str | None) -> RemoteFile:
        url = self._locator(path)
        what = f"checking {self._shown(url)}"
        size, headers = self._probe(url, what)
        etag = headers.get("etag", "")
        strong = etag if etag and not etag.startswith("W/") else ""
        identity = strong or headers.get("last-modified", "") or etag
        promises: list[Promise] = []
        header = _digest_header(headers)
        if header is not None:
            promises.append(header)
        if pinned_sha256:
            by_fragment = pinned_sha256 == self._fragment_sha256
            promises.append(Promise("sha256", pinned_sha256, "#sha256" if by_fragment else "lockfile",
                                    origin="url fragment" if by_fragment else "lockfile"))
        values = {p.value for p in promises}
        if len(values) > 1 and header is not None:
            pin = "the URL's #sha256" if self._fragment_sha256 else "the lockfile"
            raise IntegrityError(f"{what}: the server's {header.field} sha256 differs from the one {pin} pins; "
                                 "nothing was downloaded — fix the pin or the server", path=path)
        # The validator open_range pins reads to: a strong ETag, else Last-Modified (a weak ETag cannot be one).
        validator = strong or headers.get("last-modified", "")
        return RemoteFile(path=path, size=size, promises=tuple(promises), etag=identity or None,
                          locator=f"{validator}\n{url}")

    def _probe(self, url: str, what: str) -> tuple[int, dict[str, str]]:
        """A file's size and headers from a HEAD; from a one-byte GET where HEAD is refused (a URL presigned for
        GET only, as S3's and GCS's are, answers a HEAD with 403; some servers have no HEAD)."""
        body = self._request("HEAD", url, {"Accept-Encoding": "identity"}, what)
        if body.status in (403, 405, 501):
            body.close()
            body = self._request("GET", url, {"Range": "bytes=0-0", "Accept-Encoding": "identity"}, what)
            if body.status in (206, 416):
                body.read_all()  # a byte, or nothing: the connection stays reusable
                total = body.headers.get("content-range", "").rpartition("/")[2]
                if not total.isdigit():
                    raise SourceError(f"{what}: the server's Content-Range gives no size")
                return int(total), body.headers
        if body.status != 200:
            raise self._status(body, what)
        body.close()
        try:
            return int(body.headers.get("content-length", "")), body.headers
        except ValueError:
            raise SourceError(f"{what}: the server sent no Content-Length, so the size cannot be checked") from None

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file  # the HEAD of the listing already gave all a server says about a file

    # -- reads ---------------------------------------------------------------------
    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged GET pinned to the listed version by If-Range; read straight from the socket."""
        from weightsync.sources.connections import RangeBody

        validator, _, url = file.locator.partition("\n")
        what = f"downloading {self._shown(url)}"
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if validator:
            headers["If-Range"] = validator
        body = self._request("GET", url, headers, what)
        status = body.status
        if status not in (200, 206):
            raise self._status(body, what)
        reply_validator = body.headers.get("etag", "") if validator.startswith('"') else \
            body.headers.get("last-modified", "")
        if validator and reply_validator and reply_validator != validator:
            body.close()
            raise IntegrityError(f"{what}: the file changed at the source since it was listed ({validator} then, "
                                 f"{reply_validator} now); nothing was published — rerun to sync the new version",
                                 path=file.path)
        if status == 200:
            if start == 0 and end == file.size:
                return RangeBody(body, what)
            body.close()
            if validator and not reply_validator:
                raise IntegrityError(f"{what}: the server answered a ranged request pinned to {validator} with the "
                                     "whole file, so it changed since it was listed; nothing was published — "
                                     "rerun to sync the new version", path=file.path)
            raise IntegrityError(f"{what}: the server ignored the byte range (bytes {start}-{end - 1}) and sent "
                                 "the whole file; cannot resume safely — serve it with Range support",
                                 path=file.path)
        expected = f"bytes {start}-{end - 1}/{file.size}"
        if body.headers.get("content-range", "") != expected:
            got = body.headers.get("content-range")
            body.close()
            if got and got.startswith(f"bytes {start}-{end - 1}/"):
                raise IntegrityError(f"{what}: the file's size changed at the source since it was listed "
                                     f"(Content-Range {got!r}, listed {file.size} bytes)", path=file.path)
            raise TransientError(f"{what}: unexpected Content-Range {got!r}")
        return RangeBody(body, what)

    # -- HTTP ----------------------------------------------------------------------
    def _request(self, method: str, url: str, extra: dict[str, str], what: str) -> Body:
        """`method` on `url`, following redirects; the token only to the source's own origin."""
        import http.client
        import ssl

        origin = self._parts
        token = http_token()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                headers = {"Host": parts.netloc, "User-Agent": USER_AGENT, **extra}
                if token and (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc):
                    headers["Authorization"] = f"Bearer {token}"
                if parts.scheme not in ("http", "https"):
                    raise SourceError(f"{what}: redirected to a {parts.scheme or 'relative'}:// URL")
                port = parts.port or (443 if parts.scheme == "https" else 80)
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                body = self._pool.send(parts.scheme, parts.hostname or "", port, method, target, headers)
                if body.status not in (301, 302, 303, 307, 308):
                    return body
                location = body.headers.get("location", "")
                if method == "HEAD":
                    body.close()
                else:
                    body.read_all()
                if not location:
                    raise SourceError(f"{what}: HTTP {body.status} without a Location")
                url = urljoin(url, location)
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(f"{what}: the server's TLS certificate is not trusted ({exc.verify_message}); set "
                              "SSL_CERT_FILE (or REQUESTS_CA_BUNDLE) to a CA bundle that holds its CA") from exc
        except ssl.SSLError as exc:
            if exc.reason != "WRONG_VERSION_NUMBER":
                raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
            raise SourceError(f"{what}: the server does not speak TLS on that port; if it serves plain HTTP, use "
                              "http:// (only on loopback or a trusted network)") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {_without_query(str(exc))}") from exc
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _status(body: Body, what: str) -> Exception:
        """The error an unexpected reply means; the body is dropped."""
        status, headers = body.status, body.headers
        body.close()
        if status in TRANSIENT_STATUS or status >= 500:
            return TransientError(f"{what}: HTTP {status}", retry_after(headers.get("retry-after", "")))
        if status in (401, 403):
            hint = f"check {TOKEN_ENV}" if http_token() else f"set {TOKEN_ENV} to a bearer token the server accepts"
            return SourceError(f"{what}: access denied (HTTP {status}); {hint}")
        if status in (404, 410):
            return SourceError(f"{what}: not found (HTTP {status}); check the URL")
        if status == 416:
            return IntegrityError(f"{what}: the server has fewer bytes than listed (HTTP 416): the file changed")
        return SourceError(f"{what}: HTTP {status}")

    @property
    def _pool(self) -> Pool:
        from weightsync.sources.connections import Pool

        with self._pool_lock:
            if self._connections is None:
                extra = os.environ.get("REQUESTS_CA_BUNDLE", "")
                if extra and not os.access(extra, os.R_OK):
                    raise SourceError(f"REQUESTS_CA_BUNDLE={extra} cannot be read; point it at a PEM bundle of "
                                      "the CAs to trust, or unset it")
                # On top of the system's CAs (and SSL_CERT_FILE, which OpenSSL reads for them), not instead:
                # a platform that sets one of the two for everything must not hide the CA a user adds with the
                # other.
                self._connections = Pool(self.transfer.connect_timeout, self.transfer.stall_timeout,
                                         self.transfer.concurrency + 4, extra_ca=extra)
            return self._connections

    @staticmethod
    def _shown(url: str) -> str:
        return _without_query(url.rpartition("\n")[2])


def _without_query(url: str) -> str:
    """`url` without its query string (where presigned URLs keep their signature); the fragment stays."""
    head, hash_sign, fragment = url.partition("#")
    return head.split("?", 1)[0] + hash_sign + fragment


def _digest_header(headers: dict[str, str]) -> Promise | None:
    """A sha-256 from Repr-Digest (RFC 9530) or Digest (RFC 3230), as a hex promise; None if absent or bad."""
    import base64
    import binascii

    for name, pattern in (("repr-digest", REPR_DIGEST), ("digest", LEGACY_DIGEST)):
        found = pattern.search(headers.get(name, ""))
        if not found:
            continue
        try:
            raw = base64.b64decode(found[1], validate=True)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32 and HEX.fullmatch(raw.hex()):
            return Promise("sha256", raw.hex(), "Repr-Digest" if name == "repr-digest" else "Digest")
    return None

