"""A faithful, in-process fake of the Hugging Face Hub for offline tests.

Why this exists: weightsync must be tested against the *real* wire protocol that
`huggingface_hub` speaks (HEAD on /resolve, 302 to a signed CDN URL, X-Linked-Etag,
cursor pagination via `Link`, X-Error-Code based error mapping ...), with no
internet. Everything is stdlib: two `ThreadingHTTPServer`s in background threads.

* the Hub origin (`hub.url`) serves `/api/...` and `/{repo}/resolve/...`;
* a separate CDN origin (`hub.cdn_url`, other port) serves LFS bytes. It must be a
  different origin: `huggingface_hub` follows same-origin redirects on its metadata
  HEAD and would then read metadata from the CDN response, and httpx only strips the
  Authorization header on cross-origin redirects. Both behaviours match the real Hub
  only when the CDN is another origin.

Repo content is stored content-addressed on disk (blobs/<sha256>) and streamed, so
hundreds of MB never sit in RAM. Pass a `pathlib.Path` to `add_commit` for big files.

Tokens are never printed or logged: the request log keeps only the fact that an
Authorization header was sent (its value is replaced by `Bearer <redacted>`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import mimetypes
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["Faults", "HubServer", "RequestRecord", "configure_huggingface_hub", "git_blob_sha1"]

DEFAULT_TOKEN = "hf_good_token"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_CHUNK = 1024 * 1024
_SHA40 = re.compile(r"[0-9a-f]{40}")
_SHA64 = re.compile(r"[0-9a-f]{64}")
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_SUBPATHS = {"revision", "tree", "paths-info", "refs", "commits", "resolve", "treesize"}
_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbe4904"


def git_blob_sha1(content: bytes) -> str:
    """Git blob id of `content` (what the Hub reports as `oid` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file text; its git blob id is the `oid` of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class _Blob:
    """One stored file content; shared by every commit/repo that has the same bytes."""

    sha256: str
    size: int
    md5: str
    path: Path
    git_sha1: str  # git blob id of the raw content


@dataclass(frozen=True)
class _File:
    """A file in a commit: content + whether it is tracked by LFS there."""

    blob: _Blob
    lfs: bool

    @property
    def oid(self) -> str:
        """Blob id as listed by the Hub: git id of the pointer for LFS, of the content otherwise."""
        if self.lfs:
            return git_blob_sha1(lfs_pointer(self.blob.sha256, self.blob.size))
        return self.blob.git_sha1

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.blob.sha256, self.blob.size))


@dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, _File]
    message: str
    timestamp: int
    tree_sha: str
    dir_oids: dict[str, str]  # "" is the root


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    created_at: float
    private: bool = False
    gated: bool | str = False
    allowed_tokens: set[str] | None = None  # None: every valid token has access
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Branch, tag, full ref name (refs/heads/x, refs/tags/x) or full commit sha -> sha."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return self.branches[revision[11:]]
        if revision.startswith("refs/tags/") and revision[10:] in self.tags:
            return self.tags[revision[10:]]
        if _SHA40.fullmatch(revision) and revision in self.commits:
            return revision
        return None


@dataclass
class RequestRecord:
    """One HTTP request as seen by the server (mutable while the response is in flight).

    `path` is the raw (still percent-encoded) URL path, `query` the raw query string;
    CDN requests have paths under `/cdn/`. `headers` has lower-case keys and the
    Authorization value redacted. `bytes_sent` counts body bytes only.
    """

    method: str
    path: str
    query: str
    range_header: str | None
    status: int
    bytes_sent: int
    headers: dict[str, str]
    dropped: bool = False  # connection cut by the drop_after_bytes fault

    @property
    def authenticated(self) -> bool:
        """Whether an Authorization header was sent (its value is never kept)."""
        return "authorization" in self.headers

    @property
    def is_cdn(self) -> bool:
        return self.path.startswith("/cdn/")


@dataclass
class Faults:
    """Mutable fault-injection knobs; assign a new `Faults()` to reset counters too.

    Paths are repo file paths (`"model.safetensors"`) or repo-qualified
    (`"owner/name/model.safetensors"`). They apply to requests that serve file bytes:
    GET /resolve of a non-LFS file and GET on the CDN for LFS files (`fail_status`
    also applies to HEAD/GET /resolve). A `fail_status` key starting with "/" is a
    decoded URL-path prefix and can fail any request, e.g. `"/api/models/o/r/tree"`.
    """

    corrupt: set[str] = field(default_factory=set)
    corrupt_offset: int | None = None  # default: the middle byte of the file
    drop_after_bytes: int | None = None
    drop_times: int | None = None  # None: every matching request is dropped
    stall_seconds: float = 0.0
    throttle_bps: int | None = None
    only_paths: set[str] | None = None  # restrict drop/stall/throttle to these paths
    fail_status: dict[str, int] = field(default_factory=dict)
    fail_times: int | None = None  # per key; None: fail forever
    retry_after: int | None = 1  # Retry-After sent with injected 429/503
    _drops_done: int = field(default=0, init=False, repr=False)
    _fail_counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)


class _HttpError(Exception):
    """Raised inside a handler to answer with a Hub-style JSON error."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


# --------------------------------------------------------------------------- git objects


def _tree_oids(files: Mapping[str, _File]) -> tuple[str, dict[str, str]]:
    """Real git tree ids for every directory, so listings carry believable `oid`s."""
    root: dict[str, Any] = {}
    for path, f in files.items():
        node = root
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = f
    oids: dict[str, str] = {}

    def build(node: dict[str, Any], prefix: str) -> str:
        entries: list[tuple[bytes, bytes]] = []
        for name, child in node.items():
            if isinstance(child, dict):
                sub = build(child, f"{prefix}{name}/")
                entries.append(((name + "/").encode(), b"40000 " + name.encode() + b"\0" + bytes.fromhex(sub)))
            else:
                entries.append((name.encode(), b"100644 " + name.encode() + b"\0" + bytes.fromhex(child.oid)))
        body = b"".join(e for _, e in sorted(entries))
        oid = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        oids[prefix.rstrip("/")] = oid
        return oid

    return build(root, ""), oids


def _commit_sha(tree: str, parent: str | None, message: str, ts: int) -> str:
    ident = f"hubserver <hubserver@example.invalid> {ts} +0000"
    text = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "") + f"author {ident}\ncommitter {ident}\n\n"
    body = (text + message + "\n").encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


# --------------------------------------------------------------------------- server


class HubServer:
    """Fake Hugging Face Hub + LFS CDN on loopback. Use as a context manager or start()/stop()."""

    DEFAULT_TOKEN = DEFAULT_TOKEN
    #: Suffixes tracked by LFS regardless of size (subset of the Hub's default .gitattributes).
    LFS_SUFFIXES: tuple[str, ...] = (
        ".safetensors", ".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".onnx", ".msgpack",
        ".pkl", ".pickle", ".npy", ".npz", ".ot", ".tflite", ".arrow", ".parquet", ".zip", ".tar",
        ".tgz", ".gz", ".zst", ".xz", ".7z", ".joblib",
    )  # fmt: skip

    def __init__(self, host: str = "127.0.0.1", port: int = 0, cdn_port: int = 0) -> None:
        self.host = host
        self.tokens: set[str] = {DEFAULT_TOKEN}
        self.reject_invalid_tokens = True  # the real Hub 401s an unknown token even on public repos
        self.page_size: int | None = None  # None: the Hub's 1000 (50 with expand=true)
        self.cdn_url_ttl: float = 3600.0  # lifetime of signed CDN URLs, seconds
        self.faults = Faults()
        self._secret = secrets.token_bytes(16)
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._log: list[RequestRecord] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, _Blob] = {}
        self._last_ts = 0
        self._conns: set[socket.socket] = set()
        self._root = Path(tempfile.mkdtemp(prefix="hubserver-"))
        (self._root / "blobs").mkdir()
        self._hub = self._make_server(host, port, is_cdn=False)
        self._cdn = self._make_server(host, cdn_port, is_cdn=True)
        self._threads: list[threading.Thread] = []
        self._started = False

    # ----------------------------------------------------------------- lifecycle

    def _make_server(self, host: str, port: int, *, is_cdn: bool) -> _Server:
        srv = _Server((host, port), _Handler)
        srv.hub = self
        srv.is_cdn = is_cdn
        return srv

    @property
    def url(self) -> str:
        """Hub endpoint, e.g. http://127.0.0.1:43211 (set HF_ENDPOINT to this)."""
        return f"http://{self.host}:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """Origin that serves LFS bytes (redirect target of /resolve for LFS files)."""
        return f"http://{self.host}:{self._cdn.server_address[1]}"

    def start(self) -> HubServer:
        if not self._started:
            for srv in (self._hub, self._cdn):
                t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
                t.start()
                self._threads.append(t)
            self._started = True
        return self

    def stop(self) -> None:
        """Stop both listeners, cut keep-alive connections and delete the stored blobs."""
        if self._started:
            for srv in (self._hub, self._cdn):
                srv.shutdown()
            self._started = False
        for srv in (self._hub, self._cdn):
            srv.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=5)
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- repo content

    def _repo(self, repo_id: str, repo_type: str, create: bool = False) -> _Repo:
        if repo_type not in _URL_PREFIX:
            raise ValueError(f"unsupported repo_type {repo_type!r}")
        key = (repo_type, repo_id)
        with self._lock:
            repo = self._repos.get(key)
            if repo is None:
                if not create:
                    raise KeyError(f"no {repo_type} repo {repo_id!r}")
                if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
                    raise ValueError(f"invalid repo id {repo_id!r}")
                repo = self._repos[key] = _Repo(repo_type, repo_id, created_at=time.time())
            return repo

    def _store(self, content: bytes | bytearray | memoryview | os.PathLike[str]) -> _Blob:
        """Write content into the content-addressed store, hashing while copying."""
        sha256, md5, sha1 = hashlib.sha256(), hashlib.md5(), hashlib.sha1()
        tmp = self._root / "blobs" / f".tmp-{uuid.uuid4().hex}"
        if isinstance(content, os.PathLike):
            size = os.path.getsize(content)
            sha1.update(b"blob %d\0" % size)
            with open(content, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    for h in (sha256, md5, sha1):
                        h.update(chunk)
                    dst.write(chunk)
        else:
            data = bytes(content)
            size = len(data)
            sha1.update(b"blob %d\0" % size)
            for h in (sha256, md5, sha1):
                h.update(data)
            tmp.write_bytes(data)
        digest = sha256.hexdigest()
        final = self._root / "blobs" / digest
        with self._lock:
            blob = self._blobs.get(digest)
            if blob is None:
                os.replace(tmp, final)
                blob = self._blobs[digest] = _Blob(digest, size, md5.hexdigest(), final, sha1.hexdigest())
            else:
                tmp.unlink()
        return blob

    def _is_lfs(self, path: str, size: int, lfs_threshold: int) -> bool:
        return size >= lfs_threshold or path.lower().endswith(self.LFS_SUFFIXES)

    @staticmethod
    def _check_path(path: str) -> str:
        parts = path.split("/")
        if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid repo path {path!r}")
        return path

    def add_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | bytearray | memoryview | os.PathLike[str]] | None = None,
        branch: str = "main",
        message: str | None = None,
        lfs_threshold: int = 1024,
        delete: Iterable[str] = (),
        repo_type: str = "model",
        base: str | None = None,
    ) -> str:
        """Commit `files` on top of `branch` (created if missing, from `base` or empty) -> 40-hex sha.

        Files are cumulative like git; `delete` removes paths (a folder path removes
        everything under it). A file is LFS if >= `lfs_threshold` bytes or its suffix
        is in `LFS_SUFFIXES`. Pass a Path instead of bytes for big files.
        """
        repo = self._repo(repo_id, repo_type, create=True)
        stored = {self._check_path(p): self._store(c) for p, c in (files or {}).items()}
        with self._lock:
            parent = repo.branches.get(branch)
            if parent is None and base is not None:
                parent = repo.resolve(base)
                if parent is None:
                    raise KeyError(f"unknown base revision {base!r}")
            tree = dict(repo.commits[parent].files) if parent else {}
            for d in delete:
                d = d.strip("/")
                gone = [p for p in tree if p == d or p.startswith(d + "/")]
                if not gone:
                    raise KeyError(f"cannot delete {d!r}: not in {repo_id}@{branch}")
                for p in gone:
                    del tree[p]
            for p, blob in stored.items():
                tree[p] = _File(blob, self._is_lfs(p, blob.size, lfs_threshold))
            for p in tree:
                parts = p.split("/")
                for i in range(1, len(parts)):
                    if "/".join(parts[:i]) in tree:
                        raise ValueError(f"{p!r} needs {'/'.join(parts[:i])!r} to be a folder, it is a file")
            self._last_ts = max(int(time.time()), self._last_ts + 1)
            msg = message if message is not None else f"Commit {len(repo.commits) + 1}"
            tree_sha, dir_oids = _tree_oids(tree) if tree else (_EMPTY_TREE, {"": _EMPTY_TREE})
            sha = _commit_sha(tree_sha, parent, msg, self._last_ts)
            repo.commits[sha] = _Commit(sha, parent, tree, msg, self._last_ts, tree_sha, dir_oids)
            repo.branches[branch] = sha
            return sha

    def add_tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        """Create or move tag `tag` to `revision` (branch, tag or sha); returns the sha."""
        repo = self._repo(repo_id, repo_type)
        with self._lock:
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"unknown revision {revision!r}")
            repo.tags[tag] = sha
            return sha

    def set_branch(self, repo_id: str, branch: str, revision: str, repo_type: str = "model") -> str:
        """Create or force-move `branch` to `revision` (e.g. to simulate a force-push)."""
        repo = self._repo(repo_id, repo_type)
        with self._lock:
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(f"unknown revision {revision!r}")
            repo.branches[branch] = sha
            return sha

    def delete_branch(self, repo_id: str, branch: str, repo_type: str = "model") -> None:
        with self._lock:
            del self._repo(repo_id, repo_type).branches[branch]

    def delete_tag(self, repo_id: str, tag: str, repo_type: str = "model") -> None:
        with self._lock:
            del self._repo(repo_id, repo_type).tags[tag]

    def set_access(
        self,
        repo_id: str,
        private: bool | None = None,
        gated: bool | str | None = None,
        repo_type: str = "model",
        allowed_tokens: Iterable[str] | None = None,
    ) -> None:
        """Make a repo private and/or gated (None leaves a setting unchanged; creates the repo).

        `gated=True` means "auto". `allowed_tokens` restricts which valid tokens may
        read a private repo / pass the gate; by default every token in `tokens` may.
        """
        repo = self._repo(repo_id, repo_type, create=True)
        with self._lock:
            if private is not None:
                repo.private = private
            if gated is not None:
                repo.gated = "auto" if gated is True else gated
            if allowed_tokens is not None:
                repo.allowed_tokens = set(allowed_tokens)

    def set_metadata(self, repo_id: str, repo_type: str = "model", **fields: Any) -> None:
        """Extra repo-info JSON fields (tags, library_name, pipeline_tag, cardData, config...)."""
        repo = self._repo(repo_id, repo_type, create=True)
        with self._lock:
            repo.extra.update(fields)

    def resolve_revision(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        sha = self._repo(repo_id, repo_type).resolve(revision)
        if sha is None:
            raise KeyError(f"unknown revision {revision!r}")
        return sha

    def file_info(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> dict[str, Any]:
        """What the Hub would report for a file: size, sha256, oid (blob id), lfs, local blob path."""
        repo = self._repo(repo_id, repo_type)
        f = repo.commits[self.resolve_revision(repo_id, revision, repo_type)].files[path]
        return {"size": f.blob.size, "sha256": f.blob.sha256, "oid": f.oid, "lfs": f.lfs, "blob_path": f.blob.path}

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        repo = self._repo(repo_id, repo_type)
        return sorted(repo.commits[self.resolve_revision(repo_id, revision, repo_type)].files)

    def resolve_url(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> str:
        """The /resolve URL the library would build for this file."""
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    # ----------------------------------------------------------------- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of every request so far, in arrival order (both origins)."""
        with self._lock:
            return list(self._log)

    def reset_log(self) -> None:
        with self._lock:
            self._log.clear()

    def find_requests(
        self, method: str | None = None, path_prefix: str | None = None, path_contains: str | None = None
    ) -> list[RequestRecord]:
        """Filter the log; paths are raw (percent-encoded)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (path_prefix is None or r.path.startswith(path_prefix))
            and (path_contains is None or path_contains in r.path)
        ]

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being served (records are final afterwards)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this Hub."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}

    # ----------------------------------------------------------------- internals used by the handler

    def _sign(self, sha256: str, repo_key: str, path: str, expires: int) -> str:
        msg = f"{sha256}|{repo_key}|{path}|{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:40]

    def _record(self, rec: RequestRecord | None, *, start: bool) -> None:
        with self._idle:
            if start:
                assert rec is not None
                self._log.append(rec)
                self._inflight += 1
            else:
                self._inflight -= 1
                self._idle.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    hub: HubServer
    is_cdn: bool


def _path_matches(keys: Iterable[str], repo_id: str, path: str) -> bool:
    keys = set(keys)
    return path in keys or f"{repo_id}/{path}" in keys


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; every response carries Content-Length (HTTP/1.1 keep-alive)."""

    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1.0"
    sys_version = ""
    timeout = 120
    server: _Server

    # ------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.hub._lock:
            self.server.hub._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence stderr logging (and never risk printing credentials)."""

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _handle(self) -> None:
        split = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if "authorization" in headers:
            headers["authorization"] = "Bearer <redacted>"
        self.rec = RequestRecord(self.command, split.path, split.query, self.headers.get("Range"), 0, 0, headers)
        self.hub._record(self.rec, start=True)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            self.raw_path = split.path
            self.segs = [unquote(s) for s in split.path.split("/")[1:]]
            if self.segs and self.segs[-1] == "":
                self.segs.pop()
            self.query = parse_qs(split.query, keep_blank_values=True)
            try:
                self._check_path_faults()
                if self.server.is_cdn:
                    self._route_cdn()
                else:
                    self._route_hub()
            except _HttpError as e:
                self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug in the fake: answer 500 (if still possible) and show the traceback
            traceback.print_exc()
            self.close_connection = True
            if self.rec.status == 0:
                with contextlib.suppress(OSError):
                    self._send_error(_HttpError(500, f"hubserver internal error: {type(e).__name__}"))
        finally:
            self.hub._record(None, start=False)

    def _start(self, status: int, headers: Mapping[str, str], length: int) -> None:
        self.send_response(status)
        self.rec.status = status
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        self._start(status, headers, len(body))
        if self.command != "HEAD" and body:
            self.rec.bytes_sent += len(body)
            self.wfile.write(body)

    def _send_json(self, data: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(self, e: _HttpError) -> None:
        h = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": e.message, **e.headers}
        if e.code:
            h["X-Error-Code"] = e.code
        h.setdefault("X-Request-Id", f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]}")
        self._send(e.status, h, json.dumps({"error": e.message}).encode())

    def _host(self) -> str:
        return self.headers.get("Host") or f"{self.hub.host}:{self.server.server_address[1]}"

    # ------------------------------------------------------------- faults

    def _check_path_faults(self) -> None:
        """`fail_status` keys that are URL-path prefixes ("/api/...") fail any request."""
        faults = self.hub.faults
        decoded = unquote(self.raw_path)
        for key, status in list(faults.fail_status.items()):
            if key.startswith("/") and decoded.startswith(key):
                self._maybe_fail(key, status)

    def _check_file_faults(self, repo_id: str, path: str) -> None:
        faults = self.hub.faults
        for key in (path, f"{repo_id}/{path}"):
            if key in faults.fail_status:
                self._maybe_fail(key, faults.fail_status[key])

    def _maybe_fail(self, key: str, status: int) -> None:
        faults = self.hub.faults
        with self.hub._lock:
            done = faults._fail_counts.get(key, 0)
            if faults.fail_times is not None and done >= faults.fail_times:
                return
            faults._fail_counts[key] = done + 1
        headers = {}
        if status in (429, 503) and faults.retry_after is not None:
            headers["Retry-After"] = str(faults.retry_after)
        raise _HttpError(status, f"Injected fault: HTTP {status}", headers=headers)

    # ------------------------------------------------------------- auth

    def _token(self) -> str | None:
        """Bearer token if valid; raise 401 for a wrong one like the real Hub (even on public repos)."""
        auth = self.headers.get("Authorization")
        if auth is None:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip() in self.hub.tokens:
            return token.strip()
        if self.hub.reject_invalid_tokens:
            raise _HttpError(401, INVALID_CREDENTIALS)
        return None

    def _find_repo(self, repo_type: str, repo_id: str, token: str | None, *, content: bool) -> _Repo:
        with self.hub._lock:
            repo = self.hub._repos.get((repo_type, repo_id))
        allowed = repo is not None and (repo.allowed_tokens is None or token in repo.allowed_tokens)
        if repo is None or (repo.private and not (token and allowed)):
            # Same answer for missing and private repos, so existence does not leak.
            if token:
                raise _HttpError(404, "Repository not found", "RepoNotFound")
            raise _HttpError(401, "Invalid username or password.", "RepoNotFound")
        if repo.gated and content and not (token and allowed):
            kind = {"model": "model", "dataset": "dataset", "space": "space"}[repo_type]
            if token is None:
                msg = (
                    f"Access to {kind} {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                raise _HttpError(401, msg, "GatedRepo")
            msg = (
                f"Access to {kind} {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.hub.url}/{_URL_PREFIX[repo_type]}{repo_id} to ask for access."
            )
            raise _HttpError(403, msg, "GatedRepo")
        return repo

    @staticmethod
    def _commit(repo: _Repo, revision: str) -> _Commit:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    @staticmethod
    def _split_rev(repo: _Repo | None, segs: list[str], need_rest: bool) -> tuple[str, list[str]]:
        """Longest prefix of `segs` that is a known ref, so unencoded `refs/pr/1` works too."""
        if repo is not None:
            for k in range(len(segs), 0, -1):
                if need_rest and k == len(segs):
                    continue
                if repo.resolve("/".join(segs[:k])) is not None:
                    return "/".join(segs[:k]), segs[k:]
        return (segs[0] if segs else ""), segs[1:]

    # ------------------------------------------------------------- routing: hub origin

    def _route_hub(self) -> None:
        s = self.segs
        if s[:1] == ["api"]:
            if s[1:] == ["whoami-v2"]:
                return self._whoami()
            if s[1:] == ["agent-harnesses"]:
                # Fetched by huggingface_hub once per process unless telemetry is disabled.
                return self._send_json({"standardEnvVars": [], "harnesses": {}})
            if len(s) >= 3 and s[1] in _REPO_TYPES:
                return self._route_api(_REPO_TYPES[s[1]], s[2:])
            raise _HttpError(404, "Sorry, we can't find the page you are looking for.")
        repo_type = "model"
        rest = s
        if s[:1] and s[0] in ("datasets", "spaces"):
            repo_type, rest = _REPO_TYPES[s[0]], s[1:]
        for n in (2, 1):
            if len(rest) > n + 1 and rest[n] == "resolve":
                return self._resolve(repo_type, "/".join(rest[:n]), rest[n + 1 :])
        raise _HttpError(404, "Sorry, we can't find the page you are looking for.")

    def _whoami(self) -> None:
        token = self._token()
        if token is None:
            raise _HttpError(401, "Invalid username or password.")
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": "hubserver-user",
                "fullname": "Hub Server User",
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "read"}},
            }
        )

    def _api_repo_id(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        """Repo ids have 1 or 2 segments; prefer the one that exists."""
        with self.hub._lock:
            known = self.hub._repos
            if len(rest) >= 2 and (repo_type, f"{rest[0]}/{rest[1]}") in known:
                return f"{rest[0]}/{rest[1]}", rest[2:]
            if (repo_type, rest[0]) in known and (len(rest) == 1 or rest[1] in _API_SUBPATHS):
                return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] not in _API_SUBPATHS:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        return rest[0], rest[1:]

    def _route_api(self, repo_type: str, rest: list[str]) -> None:
        repo_id, sub = self._api_repo_id(repo_type, rest)
        token = self._token()
        repo = self._find_repo(repo_type, repo_id, token, content=False)
        method = self.command
        if method in ("GET", "HEAD") and not sub:
            return self._repo_info(repo, "main")
        if method in ("GET", "HEAD") and sub[0] == "revision" and len(sub) > 1:
            return self._repo_info(repo, "/".join(sub[1:]))
        if method in ("GET", "HEAD") and sub[0] == "tree" and len(sub) > 1:
            rev, path = self._split_rev(repo, sub[1:], need_rest=False)
            return self._tree(repo, rev, "/".join(path))
        if method == "POST" and sub[0] == "paths-info" and len(sub) > 1:
            return self._paths_info(repo, "/".join(sub[1:]))
        if method in ("GET", "HEAD") and sub == ["refs"]:
            return self._refs(repo)
        if method in ("GET", "HEAD") and sub[0] == "commits" and len(sub) > 1:
            return self._commits(repo, "/".join(sub[1:]))
        raise _HttpError(404, "Sorry, we can't find the page you are looking for.")

    # ------------------------------------------------------------- API endpoints

    def _flag(self, name: str) -> bool:
        return (self.query.get(name) or ["false"])[-1].lower() in ("1", "true")

    def _repo_info(self, repo: _Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        blobs = self._flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=f.blob.size, blobId=f.oid)
                if f.lfs:
                    sib["lfs"] = {"sha256": f.blob.sha256, "size": f.blob.size, "pointerSize": f.pointer_size}
            siblings.append(sib)
        owner = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": owner,
            "sha": commit.sha,
            "lastModified": _iso(commit.timestamp),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.blob.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["spaces"] = []
        if self._flag("securityStatus"):
            info["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        info.update(repo.extra)
        expand = self.query.get("expand", []) + self.query.get("expand[]", [])
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        self._send_json(info)

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str, is_dir: bool) -> dict[str, str]:
        """Most recent first-parent commit that changed `path` (what expand=true reports)."""

        def key(c: _Commit) -> str | None:
            if is_dir:
                return c.dir_oids.get(path)
            f = c.files.get(path)
            return f.oid if f else None

        cur = commit
        while cur.parent is not None and key(repo.commits[cur.parent]) == key(cur):
            cur = repo.commits[cur.parent]
        return {"id": cur.sha, "title": cur.message.splitlines()[0] if cur.message else "", "date": _iso(cur.timestamp)}

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        f = commit.files.get(path)
        if f is None:
            entry: dict[str, Any] = {"type": "directory", "oid": commit.dir_oids[path], "size": 0, "path": path}
        else:
            entry = {"type": "file", "oid": f.oid, "size": f.blob.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.blob.sha256, "size": f.blob.size, "pointerSize": f.pointer_size}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, commit, path, f is None)
            if f is not None:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return entry

    @staticmethod
    def _listing(commit: _Commit, base: str, recursive: bool) -> list[str]:
        """Paths under `base`: at each level folders first, then files; recursive is pre-order."""
        prefix = f"{base}/" if base else ""
        dirs: set[str] = set()
        files: list[str] = []
        for p in commit.files:
            if not p.startswith(prefix):
                continue
            head, sep, _ = p[len(prefix) :].partition("/")
            if sep:
                dirs.add(prefix + head)
            else:
                files.append(p)
        out: list[str] = []
        for d in sorted(dirs):
            out.append(d)
            if recursive:
                out.extend(_Handler._listing(commit, d, True))
        return out + sorted(files)

    def _page_size(self, expand: bool) -> int:
        return self.hub.page_size or (50 if expand else 1000)

    def _paginate(self, items: list[Any]) -> tuple[list[Any], dict[str, str]]:
        """Cursor pagination with a GitHub-style `Link: <...>; rel="next"` header, like the Hub."""
        cursor = (self.query.get("cursor") or [""])[-1]
        try:
            offset = int(base64.urlsafe_b64decode(cursor.encode() + b"==").decode()) if cursor else 0
        except ValueError as e:
            raise _HttpError(400, "Invalid cursor") from e
        size = self._page_size(self._flag("expand"))
        page = items[offset : offset + size]
        headers: dict[str, str] = {}
        if offset + size < len(items):
            nxt = base64.urlsafe_b64encode(str(offset + size).encode()).decode().rstrip("=")
            params = [(k, v) for k, vs in self.query.items() if k != "cursor" for v in vs]
            params.append(("cursor", nxt))
            headers["Link"] = f'<http://{self._host()}{self.raw_path}?{urlencode(params)}>; rel="next"'
        return page, headers

    def _tree(self, repo: _Repo, revision: str, path: str) -> None:
        commit = self._commit(repo, revision)
        path = path.strip("/")
        if path and path not in commit.dir_oids:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        expand = self._flag("expand")
        items = self._listing(commit, path, self._flag("recursive"))
        page, headers = self._paginate(items)
        self._send_json([self._entry(repo, commit, p, expand) for p in page], headers)

    def _paths_info(self, repo: _Repo, revision: str) -> None:
        commit = self._commit(repo, revision)
        ctype = (self.headers.get("Content-Type") or "").lower()
        paths: list[str]
        expand: bool
        if "json" in ctype:
            try:
                data = json.loads(self.body or b"{}")
            except ValueError as e:
                raise _HttpError(400, "Invalid JSON body") from e
            paths = data.get("paths") or []
            paths = [paths] if isinstance(paths, str) else paths
            expand = data.get("expand") in (True, "true", "1", 1)
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = (form.get("expand") or ["false"])[-1].lower() in ("1", "true")
        out, seen = [], set()
        for p in paths:
            p = p.strip("/")
            if not p or p in seen or (p not in commit.files and p not in commit.dir_oids):
                continue  # unknown paths are silently skipped, like the Hub
            seen.add(p)
            out.append(self._entry(repo, commit, p, expand))
        self._send_json(out)

    def _refs(self, repo: _Repo) -> None:
        def ref(name: str, full: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": sha}

        with self.hub._lock:  # tests may add commits concurrently
            all_branches, all_tags = dict(repo.branches), dict(repo.tags)
        branches = [ref(b, f"refs/heads/{b}", s) for b, s in all_branches.items() if not b.startswith("refs/")]
        data: dict[str, Any] = {
            "branches": branches,
            "converts": [ref(b[13:], b, s) for b, s in all_branches.items() if b.startswith("refs/convert/")],
            "tags": [ref(t, f"refs/tags/{t}", s) for t, s in all_tags.items()],
        }
        if self._flag("include_prs"):
            data["pullRequests"] = [ref(b[5:], b, s) for b, s in all_branches.items() if b.startswith("refs/pr/")]
        self._send_json(data)

    def _commits(self, repo: _Repo, revision: str) -> None:
        cur: _Commit | None = self._commit(repo, revision)
        items = []
        while cur is not None:
            lines = cur.message.splitlines() or [""]
            items.append(
                {
                    "id": cur.sha,
                    "title": lines[0],
                    "message": "\n".join(lines[1:]).strip(),
                    "authors": [{"user": "hubserver-user"}],
                    "date": _iso(cur.timestamp),
                }
            )
            cur = repo.commits[cur.parent] if cur.parent else None
        page, headers = self._paginate(items)
        self._send_json(page, headers)

    # ------------------------------------------------------------- /resolve

    def _resolve(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        if self.command not in ("GET", "HEAD"):
            raise _HttpError(405, "Method not allowed")
        token = self._token()
        repo = self._find_repo(repo_type, repo_id, token, content=True)
        rev, path_segs = self._split_rev(repo, rest, need_rest=True)
        commit = self._commit(repo, rev)
        path = "/".join(path_segs)
        f = commit.files.get(path)
        if f is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        self._check_file_faults(repo.repo_id, path)
        name = path.rsplit("/", 1)[-1]
        common = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Vary": "Origin, Accept",
            "Access-Control-Expose-Headers": "X-Repo-Commit,X-Linked-Etag,X-Linked-Size,ETag,Content-Range,Link",
            "X-Request-Id": f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]}",
        }
        if f.lfs:
            # Real Hub: 302 to a signed CDN URL; the file metadata rides on this very response.
            expires = int(time.time() + self.hub.cdn_url_ttl)
            repo_key = f"{repo_type}:{repo.repo_id}"
            params = {
                "response-content-disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
                "repo": repo_key,
                "path": path,
                "Expires": str(expires),
                "Signature": self.hub._sign(f.blob.sha256, repo_key, path, expires),
            }
            host = self._host().rsplit(":", 1)[0]
            location = f"http://{host}:{self.hub._cdn.server_address[1]}/cdn/lfs/{f.blob.sha256}?{urlencode(params)}"
            body = f"Found. Redirecting to {location}".encode()
            headers = {
                **common,
                "Location": location,
                "ETag": f'"{f.oid}"',
                "X-Linked-Etag": f'"{f.blob.sha256}"',
                "X-Linked-Size": str(f.blob.size),
                "Content-Type": "text/plain; charset=utf-8",
            }
            return self._send(302, headers, body)
        headers = {
            **common,
            "ETag": f'"{f.oid}"',
            "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";",
            "Cache-Control": "private, max-age=0, must-revalidate",
        }
        self._serve_blob(f.blob, headers, f'"{f.oid}"', repo.repo_id, path)

    # ------------------------------------------------------------- CDN origin

    def _route_cdn(self) -> None:
        s = self.segs
        if self.command not in ("GET", "HEAD") or len(s) != 3 or s[:2] != ["cdn", "lfs"] or not _SHA64.fullmatch(s[2]):
            return self._s3_error(404, "NoSuchKey", "The specified key does not exist.")
        sha256 = s[2]
        q = {k: v[-1] for k, v in self.query.items()}
        repo_key, path, expires, sig = q.get("repo", ""), q.get("path", ""), q.get("Expires", ""), q.get("Signature")
        if (
            not expires.isdigit()
            or sig is None
            or not hmac.compare_digest(sig, self.hub._sign(sha256, repo_key, path, int(expires)))
        ):
            return self._s3_error(403, "AccessDenied", "Invalid signature")
        if int(expires) < time.time():
            return self._s3_error(403, "AccessDenied", "Request has expired")
        with self.hub._lock:
            blob = self.hub._blobs.get(sha256)
        if blob is None:
            return self._s3_error(404, "NoSuchKey", "The specified key does not exist.")
        repo_id = repo_key.partition(":")[2]
        try:
            self._check_file_faults(repo_id, path)
        except _HttpError as e:
            return self._s3_error(e.status, "ServiceUnavailable", e.message, e.headers)
        name = path.rsplit("/", 1)[-1]
        etag = f'"{blob.md5}"'  # S3-style ETag: md5 of the object, not the sha256
        headers = {
            "Content-Type": "binary/octet-stream",
            "Accept-Ranges": "bytes",
            "Content-Disposition": q.get("response-content-disposition", f'inline; filename="{name}";'),
            "Cache-Control": "public, max-age=604800, immutable, s-maxage=604800",
            "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(blob.path.stat().st_mtime)),
            "X-Cache": "Hit from cloudfront",
        }
        self._serve_blob(blob, headers, etag, repo_id, path)

    def _s3_error(self, status: int, code: str, message: str, extra: Mapping[str, str] | None = None) -> None:
        body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
        self._send(status, {"Content-Type": "application/xml", **(extra or {})}, body.encode())

    # ------------------------------------------------------------- byte serving

    def _parse_range(self, size: int, etag: str) -> tuple[int, int] | str | None:
        """(start, end_inclusive), None for the whole file, or "416" if unsatisfiable."""
        header = self.headers.get("Range")
        if not header or self.command == "HEAD":
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            return None
        m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
        if not m or (not m.group(1) and not m.group(2)):
            return None  # malformed or multi-range: ignore, serve 200 (RFC 9110 allows it)
        if not m.group(1):
            suffix = int(m.group(2))
            if suffix == 0 or size == 0:
                return "416"
            return max(0, size - suffix), size - 1
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if start >= size or end < start:
            return "416"
        return start, min(end, size - 1)

    def _serve_blob(self, blob: _Blob, headers: dict[str, str], etag: str, repo_id: str, path: str) -> None:
        size = blob.size
        rng = self._parse_range(size, etag)
        headers = {**headers, "ETag": etag}
        if rng == "416":
            body = b""
            h = {**headers, "Content-Range": f"bytes */{size}"}
            self._send(416, h, body)
            return
        if rng is None:
            start, end, status = 0, size - 1, 200
        else:
            assert isinstance(rng, tuple)
            start, end = rng
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        self._start(status, headers, length)
        if self.command == "HEAD" or length == 0:
            return
        self._stream(blob, start, length, repo_id, path)

    def _stream(self, blob: _Blob, start: int, length: int, repo_id: str, path: str) -> None:
        faults = self.hub.faults
        targeted = faults.only_paths is None or _path_matches(faults.only_paths, repo_id, path)
        drop_at: int | None = None
        if targeted and faults.drop_after_bytes is not None:
            with self.hub._lock:
                if faults.drop_times is None or faults._drops_done < faults.drop_times:
                    faults._drops_done += 1
                    drop_at = faults.drop_after_bytes
        corrupt_at: int | None = None
        if _path_matches(faults.corrupt, repo_id, path) and blob.size:
            off = faults.corrupt_offset if faults.corrupt_offset is not None else blob.size // 2
            if start <= off < start + length:
                corrupt_at = off
        throttle = faults.throttle_bps if targeted else None
        if targeted and faults.stall_seconds:
            time.sleep(faults.stall_seconds)

        to_send = length if drop_at is None else min(length, drop_at)
        with open(blob.path, "rb") as fh:
            if drop_at is None and corrupt_at is None and throttle is None:
                self._sendfile(fh, start, to_send)
            else:
                self._send_chunks(fh, start, to_send, corrupt_at, throttle)
        if drop_at is not None and to_send < length:
            self.rec.dropped = True
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _sendfile(self, fh: BinaryIO, start: int, count: int) -> None:
        """Zero-copy path; bytes_sent is bumped before each chunk so readers never see it lag."""
        offset = start
        while count > 0:
            n = min(count, 8 * _CHUNK)
            self.rec.bytes_sent += n
            sent = self.connection.sendfile(fh, offset, n)
            if sent < n:
                self.rec.bytes_sent -= n - sent
                raise BrokenPipeError("short sendfile")
            offset += n
            count -= n

    def _send_chunks(self, fh: BinaryIO, start: int, count: int, corrupt_at: int | None, throttle: int | None) -> None:
        fh.seek(start)
        pos = start
        chunk_size = _CHUNK if throttle is None else max(1024, min(_CHUNK, throttle // 20))
        t0 = time.monotonic()
        sent_total = 0
        while count > 0:
            data = fh.read(min(chunk_size, count))
            if not data:
                break
            if corrupt_at is not None and pos <= corrupt_at < pos + len(data):
                buf = bytearray(data)
                buf[corrupt_at - pos] ^= 0xFF
                data = bytes(buf)
            self.rec.bytes_sent += len(data)
            self.wfile.write(data)
            pos += len(data)
            count -= len(data)
            sent_total += len(data)
            if throttle:
                ahead = sent_total / throttle - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)


# --------------------------------------------------------------------------- client-side helper


@contextlib.contextmanager
def configure_huggingface_hub(hub: HubServer, home: str | os.PathLike[str]) -> Iterator[None]:
    """Point an already-imported `huggingface_hub` at `hub` for the duration of the block.

    Why: huggingface_hub reads HF_ENDPOINT, HF_HOME, telemetry and Xet settings into
    module constants *at import time*, so setting env vars in a test is not enough
    once any module imported it. This patches env + constants and resets the shared
    HTTP session (its pooled connections point at a previous server).
    Telemetry must be off, or the library fetches /api/agent-harnesses once per process.
    """
    from huggingface_hub import constants, hf_api  # lazy: the server itself is stdlib-only
    from huggingface_hub.utils import _http

    home = str(home)
    env = {**hub.env(), "HF_HOME": home, "HF_HUB_CACHE": os.path.join(home, "hub")}
    values = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HUGGINGFACE_HUB_CACHE": os.path.join(home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(home, "assets"),
        "HF_TOKEN_PATH": os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(home, "stored_tokens"),
        "HF_XET_CACHE": os.path.join(home, "xet"),
        "AGENT_HARNESSES_PATH": os.path.join(home, ".agent_harnesses.json"),
    }
    old_env = {k: os.environ.get(k) for k in [*env, "HF_TOKEN"]}
    old_values = {k: getattr(constants, k) for k in values if hasattr(constants, k)}
    old_api_endpoint = hf_api.api.endpoint  # module-level helpers (huggingface_hub.model_info...) use it
    os.environ.update(env)
    os.environ.pop("HF_TOKEN", None)
    for k, v in values.items():
        setattr(constants, k, v)
    hf_api.api.endpoint = hub.url
    _http.close_session()
    try:
        yield
    finally:
        _http.close_session()
        hf_api.api.endpoint = old_api_endpoint
        for k, v in old_values.items():
            setattr(constants, k, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
