"""Hugging Face Hub source: `hf://owner/name[@revision]` (and `hf://datasets/owner/name`).

huggingface_hub does what it is good at: the endpoint (HF_ENDPOINT), auth (HF_TOKEN
or the token file), resolving a branch/tag to its commit, the file listing with
sizes, LFS sha256 and git blob ids, the resolve URL, its HTTP session and
user-agent. The bytes move through weightsync's engine as ranged GETs that follow
the Hub's 302 to its CDN, so chunking, resume, retries, locking and atomic publish
are the same as for S3, and every file is verified: LFS files by sha256, small
files by their git blob sha1, sizes always.

Xet-backed repos are served over the same plain-HTTP resolve URLs, so hf_xet is
not needed; Xet's chunk-level deduplication is not used.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

from weightsync import __version__
from weightsync.checksums import Promise
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import IntegrityError, SourceError, TransientError, UsageError
from weightsync.sources import ErrorTranslator, Features, RemoteFile, Selection, Snapshot, slugify

COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
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


def _hub() -> Any:
    """Import huggingface_hub lazily, with telemetry off (an init container phones nobody)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import huggingface_hub

    return huggingface_hub


@dataclass
class HubSource:
    """A Hub repo; each file's locator is its resolve URL at the listed commit."""

    repo_id: str
    repo_type: str = "model"
    uri_revision: str | None = None
    transfer: TransferConfig = DEFAULTS
    offline: bool = False
    kind: str = "hf"
    # httpx/h11 parse every response in Python under the GIL: more than two streams per CPU only
    # contend for it (fetch.worker_plan caps the workers; measured in benchmarks/README.md).
    features: ClassVar[Features] = Features(promises=frozenset({"sha256", "git-sha1"}), streams_per_cpu=2,
                                            refs=True)

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
        hub = _hub()
        ref = revision or self.default_ref
        api = hub.HfApi(library_name="weightsync", library_version=__version__)
        _bound_listing_timeouts(self.transfer)
        with _hub_errors(f"resolving {self.uri}@{ref}"):
            info = api.repo_info(self.repo_id, revision=ref, repo_type=self.repo_type,
                                 timeout=self.transfer.stall_timeout)
            commit = info.sha
            if not commit or not COMMIT.match(commit):
                raise SourceError(f"{self.uri}@{ref}: the Hub returned no commit id; check the revision")
            entries = api.list_repo_tree(self.repo_id, revision=commit, repo_type=self.repo_type, recursive=True)
            files = [self._remote_file(hub, entry, commit) for entry in entries if hasattr(entry, "blob_id")]
        files = [f for f in files if selection.matches(f.path)]
        if not files:
            raise SourceError(f"{self.uri}@{ref} has no files" + (" matching --include/--exclude"
                                                                    if selection.key() else ""))
        return Snapshot(revision=commit, files=tuple(files), ref=None if COMMIT.match(ref) else ref)

    def _remote_file(self, hub: Any, entry: Any, commit: str) -> RemoteFile:
        url = hub.hf_hub_url(self.repo_id, entry.path, revision=quote(commit, safe=""), repo_type=self.repo_type)
        lfs = getattr(entry, "lfs", None)
        if lfs is not None:
            sha256 = lfs.sha256.lower()
            return RemoteFile(path=entry.path, size=entry.size, promises=(Promise("sha256", sha256, "lfs"),),
                              etag=sha256, locator=url)
        return RemoteFile(path=entry.path, size=entry.size, etag=entry.blob_id, locator=url,
                          promises=(Promise("git-sha1", entry.blob_id.lower(), "git blob id"),))

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    def open_range(self, file: RemoteFile, start: int, end: int) -> _HubRange:
        from huggingface_hub.utils import build_hf_headers, get_session

        url = file.locator
        headers = build_hf_headers(library_name="weightsync", library_version=__version__)
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        what = f"downloading {self.uri}/{file.path}"
        session = get_session()
        _larger_socket_reads()
        try:
            import httpx2 as httpx
        except ImportError:  # older huggingface_hub releases use plain httpx
            import httpx

        timeout = httpx.Timeout(self.transfer.stall_timeout, connect=self.transfer.connect_timeout)
        try:
            request = session.build_request("GET", url, headers=headers, timeout=timeout)
            response = session.send(request, stream=True, follow_redirects=True)
        except httpx.HTTPError as exc:
            raise TransientError(f"{what}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status != 206 and not (status == 200 and start == 0 and end == file.size):
            error_code = response.headers.get("X-Error-Code", "")
            response.close()
            if status in TRANSIENT_STATUS:
                retry_after = response.headers.get("Retry-After", "")
                raise TransientError(f"{what}: HTTP {status}",
                                     float(retry_after) if retry_after.isdigit() else None)
            if status == 200:
                raise IntegrityError(f"{what}: the server ignored the byte range; cannot resume safely")
            raise _status_error(status, error_code, what)
        expected = f"bytes {start}-{end - 1}/"
        if status == 206 and not response.headers.get("Content-Range", "").startswith(expected):
            response.close()
            raise TransientError(f"{what}: unexpected Content-Range {response.headers.get('Content-Range')!r}")
        return _HubRange(response, what)


class _HubRange:
    """readinto over an httpx streaming response; network errors become TransientError.

    The body arrives as the pieces the connection read from the socket (`iter_raw()`
    without a chunk size: httpx's ByteChunker would copy every byte twice more to cut
    fixed-size chunks), copied into the caller's buffer until it is full. An error after
    some bytes were copied is raised on the next call, so those bytes are kept.
    """

    voids: ClassVar[dict[str, str]] = {}

    def __init__(self, response: Any, what: str) -> None:
        self._response = response
        self._pieces = response.iter_raw()
        self._pending = memoryview(b"")
        self._what = what
        self._error: TransientError | None = None

    def readinto(self, buffer: memoryview) -> int:
        if self._error is not None:
            raise self._error
        filled, wanted = 0, len(buffer)
        while filled < wanted:
            if not self._pending:
                try:
                    self._pending = memoryview(next(self._pieces))
                except StopIteration:
                    break
                except Exception as exc:
                    error = TransientError(f"{self._what}: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    if not filled:
                        raise error from exc
                    self._error = error
                    break
            count = min(wanted - filled, len(self._pending))
            buffer[filled:filled + count] = self._pending[:count]
            self._pending = self._pending[count:]
            filled += count
        return filled

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken stream must not hide the real error
            self._response.close()


SOCKET_READ = 256 * 1024


def _larger_socket_reads() -> None:
    """Let httpcore read responses 256 KiB at a time instead of 64 KiB.

    Each read is a trip through h11's pure-Python parser with two copies, under the GIL,
    so on a small machine the Hub path is client-CPU bound: 256 KiB reads take ~15% off
    its CPU and wall time (benchmarks/README.md). Best effort: a release that renamed
    the constant keeps its own read size.
    """
    import sys

    for name in ("httpcore2._sync.http11", "httpcore._sync.http11"):
        connection = getattr(sys.modules.get(name), "HTTP11Connection", None)
        if connection is not None and getattr(connection, "READ_NUM_BYTES", SOCKET_READ) < SOCKET_READ:
            connection.READ_NUM_BYTES = SOCKET_READ


def _bound_listing_timeouts(transfer: TransferConfig) -> None:
    """huggingface_hub's shared client has no timeout and its listing pagination passes none: a Hub that
    accepts and never answers would hang the sync forever. Give every request without one our stall timeout."""
    from huggingface_hub.utils import get_session

    def fill_timeouts(request: Any) -> None:
        timeout = request.extensions.get("timeout") or {}
        if all(value is None for value in timeout.values()):
            stall = transfer.stall_timeout
            request.extensions["timeout"] = {"connect": transfer.connect_timeout, "read": stall, "write": stall,
                                             "pool": stall}

    fill_timeouts.weightsync = True  # type: ignore[attr-defined]
    session = get_session()
    hooks = [hook for hook in session.event_hooks.get("request", []) if not getattr(hook, "weightsync", False)]
    session.event_hooks = {**session.event_hooks, "request": [*hooks, fill_timeouts]}


def _retry_after(response: Any) -> float | None:
    """Retry-After in seconds (delta form; the HTTP-date form is ignored), or None."""
    value = (response.headers.get("Retry-After", "") if response is not None else "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


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


class _hub_errors(ErrorTranslator):
    """Map huggingface_hub exceptions to weightsync's exit-code classes."""

    def translate(self, exc: BaseException) -> Exception | None:
        from huggingface_hub import errors

        what = self.what
        if isinstance(exc, errors.GatedRepoError):
            return _status_error(403, "GatedRepo", what)
        if isinstance(exc, errors.RepositoryNotFoundError):
            return _status_error(404, "RepoNotFound", what)
        if isinstance(exc, errors.RevisionNotFoundError):
            return _status_error(404, "RevisionNotFound", what)
        if isinstance(exc, errors.HfHubHTTPError):
            response = getattr(exc, "response", None)
            status = getattr(response, "status_code", 0) or 0
            if status in TRANSIENT_STATUS:
                return TransientError(f"{what}: HTTP {status}", _retry_after(response))
            if status == 401:
                return SourceError(f"{what}: the Hub rejected the token (HTTP 401); check HF_TOKEN")
            return _status_error(status, response.headers.get("X-Error-Code", "") if response is not None else "",
                                 what)
        if isinstance(exc, errors.HFValidationError):
            return UsageError(f"{what}: {exc}")
        try:
            import httpx2 as httpx
        except ImportError:
            import httpx
        if isinstance(exc, (httpx.HTTPError, OSError)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}")
        return None
