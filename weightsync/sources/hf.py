"""Hugging Face Hub source: `hf://owner/name[@revision]` (and `hf://datasets/owner/name`).

Two JSON calls of the Hub's API (revision -> commit, then the recursive tree at that
commit: sizes, LFS sha256, git blob ids) and ranged GETs of the resolve URLs that follow
the Hub's 302 to its CDN, all over the sources' own connections (connections.py). The
endpoint and token are read as huggingface_hub reads them (HF_ENDPOINT; HF_TOKEN or the
token file), and the token goes to the Hub's host only, never to the CDN. Not importing
huggingface_hub and httpx saves their import on every cold start, and reading bodies with
http.client's readinto instead of httpx/h11 (Python parsing, two copies per read) saves a
copy per buffer (the Hub rows of benchmarks/README.md). Chunking, resume, retries,
locking and atomic publish are the engine's, as for S3, and every file is verified: LFS
files by sha256, small files by their git blob sha1, sizes always.

Xet-backed repos are served over the same plain-HTTP resolve URLs, so hf_xet is
not needed; Xet's chunk-level deduplication is not used.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

from weightsync import __version__
from weightsync.checksums import Promise
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import TRANSIENT_STATUS, Features, RemoteFile, Selection, Snapshot, retry_after, slugify

if TYPE_CHECKING:
    from weightsync.sources.connections import Body, Pool, RangeBody

COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_REDIRECTS = 5
NEXT_PAGE = re.compile(r'<([^>]+)>;\s*rel="next"')
USER_AGENT = f"weightsync/{__version__}"
# git check-ref-format's rules, which every Hub branch and tag obeys: no space, control character, ~ ^ : ? * [ \,
# no `..` or `@{`, no empty, leading or trailing component, no component that starts with `.` or ends in `.lock`.
_BAD_REF_CHARACTER = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def ref_problem(ref: str) -> str | None:
    """Why `ref` cannot name a branch, tag or commit on the Hub (None if it can)."""
    if not ref:
        return "is empty"
    if _BAD_REF_CHARACTER.search(ref):
        return "contains a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in ref or "@{" in ref or ref == "@":
        return "contains '..' or '@{'"
    if any(not part or part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        return "has an empty component, one starting with '.', or one ending in '.lock'"
    if ref.endswith("."):
        return "ends with '.'"
    return None


def _checked_ref(ref: str, origin: str) -> str:
    problem = ref_problem(ref)
    if problem:
        raise UsageError(f"{origin} {ref!r} cannot be a Hub branch, tag or commit: it {problem}; use a branch "
                         "(main), a tag (v1.0) or a 40-hex commit id")
    return ref


def hub_endpoint() -> str:
    """The Hub's base URL, as huggingface_hub reads it: HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_token() -> str | None:
    """The token huggingface_hub would send: HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else the token file
    (HF_TOKEN_PATH, or $HF_HOME/token, HF_HOME defaulting to ~/.cache/huggingface) unless implicit tokens are off."""
    env = os.environ
    token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    if env.get("HF_HUB_DISABLE_IMPLICIT_TOKEN", "").lower() in ("1", "true", "yes", "on"):
        return None
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    try:
        with open(env.get("HF_TOKEN_PATH") or os.path.join(home, "token")) as handle:
            return handle.read().strip() or None
    except OSError:
        return None


@dataclass
class HubSource:
    """A Hub repo; each file's locator is its resolve URL at the listed commit."""

    repo_id: str
    repo_type: str = "model"
    uri_revision: str | None = None
    transfer: TransferConfig = DEFAULTS
    offline: bool = False
    kind: str = "hf"
    features: ClassVar[Features] = Features(promises=frozenset({"sha256", "git-sha1"}), refs=True)
    _connections: Pool | None = field(default=None, repr=False)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_uri(cls, uri: str, transfer: TransferConfig = DEFAULTS, *, offline: bool = False) -> HubSource:
        rest = uri[len("hf://"):].strip("/")
        repo_type = "model"
        for prefix, kind in (("datasets/", "dataset"), ("models/", "model")):
            if rest.startswith(prefix):
                rest, repo_type = rest[len(prefix):], kind
        repo_id, _, revision = rest.partition("@")
        if not REPO_ID.match(repo_id):
            raise UsageError(f"--source {uri!r} is not a Hub repo; use hf://owner/name[@revision] "
                             "or hf://datasets/owner/name")
        if revision:
            _checked_ref(revision, f"the revision in --source {uri!r}:")
        return cls(repo_id=repo_id, repo_type=repo_type, uri_revision=revision or None,
                   transfer=transfer, offline=offline)

    @property
    def uri(self) -> str:
        return f"hf://{'datasets/' if self.repo_type == 'dataset' else ''}{self.repo_id}"

    @property
    def default_name(self) -> str:
        return slugify("hf", "datasets" if self.repo_type == "dataset" else "", self.repo_id)

    @property
    def default_ref(self) -> str:
        return self.uri_revision or "main"

    def pinned_revision(self, revision: str | None) -> str | None:
        if revision:
            _checked_ref(revision, "--revision")
            if self.uri_revision and revision != self.uri_revision:
                raise UsageError(f"--revision {revision} and the @{self.uri_revision} of --source {self.uri}@"
                                 f"{self.uri_revision} name two revisions; give one of them")
        wanted = revision or self.uri_revision
        return wanted if wanted and COMMIT.match(wanted) else None

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        ref = revision or self.default_ref
        api = f"{hub_endpoint()}/api/{self.repo_type}s/{self.repo_id}"
        info = self._json(f"{api}/revision/{quote(ref, safe='')}", f"resolving {self.uri}@{ref}")
        commit = info.get("sha") if isinstance(info, dict) else None
        if not isinstance(commit, str) or not COMMIT.match(commit):
            raise SourceError(f"{self.uri}@{ref}: the Hub returned no commit id; check the revision")
        files: list[RemoteFile] = []
        url: str | None = f"{api}/tree/{commit}?recursive=true&expand=false"
        while url:  # the Hub pages long listings with a `Link: <...>; rel="next"` header
            entries, url = self._json_page(url, f"listing {self.uri}@{commit[:12]}")
            files.extend(self._remote_file(entry, commit) for entry in entries if entry.get("type") == "file")
        files = [f for f in files if selection.matches(f.path)]
        if not files:
            raise SourceError(f"{self.uri}@{ref} has no files" + (" matching --include/--exclude"
                                                                    if selection.key() else ""))
        return Snapshot(revision=commit, files=tuple(files), ref=None if COMMIT.match(ref) else ref)

    def _remote_file(self, entry: dict[str, Any], commit: str) -> RemoteFile:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        url = f"{hub_endpoint()}/{prefix}{self.repo_id}/resolve/{commit}/{quote(entry['path'])}"
        path, size, blob_id = str(entry["path"]), int(entry.get("size") or 0), str(entry.get("oid") or "")
        lfs = entry.get("lfs")
        if isinstance(lfs, dict) and lfs.get("oid"):
            sha256 = str(lfs["oid"]).lower()
            return RemoteFile(path=path, size=size, promises=(Promise("sha256", sha256, "lfs"),), etag=sha256,
                              locator=url)
        return RemoteFile(path=path, size=size, etag=blob_id, locator=url,
                          promises=(Promise("git-sha1", blob_id.lower(), "git blob id"),))

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    def _json(self, url: str, what: str) -> Any:
        return self._json_page(url, what)[0]

    def _json_page(self, url: str, what: str) -> tuple[Any, str | None]:
        """One API reply's JSON and the next page's URL (None on the last)."""
        import json

        body = self._get(url, {}, what)
        if body.status != 200:
            raise self._status(body, what)
        try:
            data = body.read_all()
        except OSError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            parsed = json.loads(data)
        except ValueError as exc:
            raise SourceError(f"{what}: the Hub's reply is not JSON ({data[:80]!r}); check HF_ENDPOINT") from exc
        following = NEXT_PAGE.search(body.headers.get("link", ""))
        return parsed, following[1] if following else None

    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeBody:
        """A ranged GET of the resolve URL, following the Hub's redirect to its CDN, read straight from the
        socket (connections.py)."""
        from weightsync.sources.connections import RangeBody

        what = f"downloading {self.uri}/{file.path}"
        body = self._get(file.locator, {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}, what)
        status = body.status
        if status != 206 and not (status == 200 and start == 0 and end == file.size):
            if status == 200:
                body.close()
                raise IntegrityError(f"{what}: the server ignored the byte range; cannot resume safely")
            raise self._status(body, what)
        expected = f"bytes {start}-{end - 1}/"
        if status == 206 and not body.headers.get("content-range", "").startswith(expected):
            body.close()
            raise TransientError(f"{what}: unexpected Content-Range {body.headers.get('content-range')!r}")
        return RangeBody(body, what)

    def _get(self, url: str, extra: dict[str, str], what: str) -> Body:
        """GET `url`, following redirects; the token goes to the Hub's own host only, never to its CDN."""
        import http.client
        import urllib.parse

        hub_host = urllib.parse.urlsplit(hub_endpoint()).netloc
        token = hub_token()
        try:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urllib.parse.urlsplit(url)
                headers = {"Host": parts.netloc, "User-Agent": USER_AGENT, **extra}
                if token and parts.netloc == hub_host:
                    headers["Authorization"] = f"Bearer {token}"
                port = parts.port or (443 if parts.scheme == "https" else 80)
                target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                body = self._pool.send(parts.scheme, parts.hostname or "", port, "GET", target, headers)
                if body.status not in (301, 302, 303, 307, 308):
                    return body
                body.read_all()
                url = urllib.parse.urljoin(url, body.headers.get("location", ""))
        except (OSError, http.client.HTTPException) as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise SourceError(f"{what}: more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _status(body: Body, what: str) -> Exception:
        """The error an unexpected reply means, by status and the Hub's X-Error-Code; the body is dropped."""
        status, headers = body.status, body.headers
        body.close()
        if status in TRANSIENT_STATUS:
            return TransientError(f"{what}: HTTP {status}", retry_after(headers.get("retry-after", "")))
        error_code = headers.get("x-error-code", "")
        if status == 401 and not error_code and hub_token():
            return SourceError(f"{what}: the Hub rejected the token (HTTP 401); check HF_TOKEN")
        return _status_error(status, error_code, what)

    @property
    def _pool(self) -> Pool:
        from weightsync.sources.connections import Pool

        with self._pool_lock:
            if self._connections is None:
                self._connections = Pool(self.transfer.connect_timeout, self.transfer.stall_timeout,
                                         self.transfer.concurrency + 4)
            return self._connections



def _status_error(status: int, error_code: str, what: str) -> SourceError:
    if error_code == "GatedRepo":
        return SourceError(f"{what}: the repo is gated; accept its terms on the Hub and set HF_TOKEN to a token "
                           "of an account that has access")
    if error_code == "RepoNotFound" or (status == 401 and not error_code):
        return SourceError(f"{what}: repo not found, private, or the token is invalid (HTTP {status}); check the "
                           "repo id and HF_TOKEN")
    if error_code == "RevisionNotFound":
        return SourceError(f"{what}: revision not found; check --revision")
    if error_code == "EntryNotFound" or status == 404:
        return SourceError(f"{what}: file not found at that revision (HTTP {status})")
    return SourceError(f"{what}: HTTP {status} {error_code}".strip())
