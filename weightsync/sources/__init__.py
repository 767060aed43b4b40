"""The source interface: list files (path, size, checksum) and read a byte range.

Every backend (`file`, `s3`, `hf`, `gs`, `az`, `oci`, `https`) implements `Source` and passes one conformance
suite (tests/test_source_conformance.py); the engine never knows which one it
talks to. What a backend can do beyond the minimum is declared in its `Features`
(as rclone's fs.Features), never probed with getattr. Each listed `RemoteFile`
carries an opaque `locator` (an S3 key, a resolve URL, an absolute path), so
`open_range` needs nothing but the file. Backends import their heavy libraries
(their HTTP clients) lazily (see weightsync/lazy.py), so constructing a
Source costs nothing and the warm path never pays for them. Adding a backend:
docs/architecture.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from weightsync.checksums import Evidence, Promise
from weightsync.config import DEFAULTS, TransferConfig
from weightsync.errors import SourceError, TransientError, UsageError, WeightsyncError

if TYPE_CHECKING:
    from weightsync.manifest import ManifestEntry


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model as the source describes it.

    `promises` are the checksums the source vouches for (see checksums.py); the engine
    verifies the cheapest sound one. `etag` is an opaque identity of this exact content
    at the source, used to invalidate resume state and to reuse files across revisions.
    `locator` is where the source finds the bytes (opaque to everything but the source that listed it).
    `metadata_requests` counts the requests the describe step spent learning the promises.
    """

    path: str
    size: int
    promises: tuple[Promise, ...] = ()
    etag: str | None = None
    locator: str = field(default="", compare=False)
    metadata_requests: int = field(default=0, compare=False)

    @property
    def sha256_promise(self) -> Promise | None:
        """A whole-file sha256 the source (or a lockfile) promised, if any: it keys reuse across revisions."""
        return next((p for p in self.promises if p.algorithm == "sha256" and not p.parts and p.usable), None)

    @property
    def sha256(self) -> str | None:
        promise = self.sha256_promise
        return promise.value if promise else None

    @property
    def evidence(self) -> Evidence:
        return Evidence.of(self.promises)

    def with_promises(self, promises: tuple[Promise, ...], requests: int = 0) -> RemoteFile:
        return replace(self, promises=promises, metadata_requests=self.metadata_requests + requests)


@dataclass(frozen=True)
class Snapshot:
    """A resolved, immutable view of the source: what `revision` means right now."""

    revision: str
    files: tuple[RemoteFile, ...]
    ref: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Features:
    """What a backend can do beyond listing and ranged reads, declared once per backend.

    The engine and the fetcher read these instead of asking `hasattr`; the conformance
    suite checks that each backend behaves as it declares.
    """

    describes: bool = False
    """`describe` may learn promises the listing lacks (and spend requests on it); False: it never does."""
    promises: frozenset[str] = frozenset()
    """The checksum algorithms this source can promise (checksums.ALGORITHMS names); empty: sizes only."""
    voids_promises: bool = False
    """A response may prove a listed promise unsound (an SSE-KMS object's ETag is no MD5): readers say so in
    `RangeReader.voids`, and the file is verified by the next best promise."""
    streams_per_cpu: int | None = None
    """Past this many concurrent streams per usable CPU a stream only adds contention (a reader that parses
    HTTP in Python under the GIL); None: no such limit."""
    refs: bool = False
    """Revisions have names that move (branches, tags), recorded under refs/ for --offline."""


class RangeReader(Protocol):
    """One ranged read in flight: `readinto` until it returns 0, then `close`."""

    voids: dict[str, str]
    """Promise field -> why this response proved it unsound; always empty unless Features.voids_promises."""

    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class PinnedFiles(Protocol):
    """The files a lockfile pins (a `lockfile.Lockfile` is one): what a source that cannot list, an https:// base
    URL, is told to fetch."""

    @property
    def files(self) -> tuple[ManifestEntry, ...]: ...

    @property
    def revision(self) -> str: ...

    @property
    def origin(self) -> str: ...


class Source(Protocol):
    """What the engine needs from a backend."""

    kind: str
    uri: str
    default_name: str
    default_ref: str | None
    features: Features

    def pinned_revision(self, revision: str | None) -> str | None:
        """The revision id if `revision` names immutable content (no network needed), else None."""

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        """List the source (network) and resolve `revision` to an immutable id."""

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        """Fill in the promises the listing alone does not give (may cost requests).

        Without `thorough` a source may skip files whose listed promise is good enough;
        `thorough` (--require-checksum, lockfile checks) asks for everything it can learn.
        """

    def open_range(self, file: RemoteFile, start: int, end: int) -> RangeReader:
        """A stream of bytes [start, end) of `file`, found by `file.locator` alone (no state from `snapshot`);
        raise TransientError on retryable failures, a WeightsyncError (with its exit code) on fatal ones."""


@dataclass(frozen=True)
class Selection:
    """--include / --exclude globs; fnmatch semantics where `*` also matches `/` (as the Hub's)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def matches(self, path: str) -> bool:
        from fnmatch import fnmatchcase

        if self.include and not any(fnmatchcase(path, pattern) for pattern in self.include):
            return False
        return not any(fnmatchcase(path, pattern) for pattern in self.exclude)

    def flags(self) -> list[str]:
        """The command-line flags that ask for this filter set: `--include GLOB ... --exclude GLOB ...`."""
        return [*(arg for glob in self.include for arg in ("--include", glob)),
                *(arg for glob in self.exclude for arg in ("--exclude", glob))]

    def key(self) -> str:
        """A short stable id of the filter set, '' when nothing is filtered."""
        if not self.include and not self.exclude:
            return ""
        import hashlib  # OpenSSL's (~4 ms to load): only a filtered sync needs it

        text = "\n".join(["include", *self.include, "exclude", *self.exclude])
        return hashlib.sha256(text.encode()).hexdigest()[:8]


class ErrorTranslator:
    """`with Translator(what):` re-raises a backend library's exception as the weightsync error of its exit code.

    One place per backend decides what is "not found", "denied", "retry" or "bad input"; weightsync's own
    errors pass through untouched, and anything `translate` does not know (None) propagates as it is.
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, (WeightsyncError, TransientError)):
            return False
        translated = self.translate(exc)
        if translated is None:
            return False
        raise translated from exc

    def translate(self, exc: BaseException) -> Exception | None:
        raise NotImplementedError


def listing_digest(entries: list[tuple[str, int, str]]) -> str:
    """A revision id for sources without one: digest of (path, size, identity), sorted.

    An unchanged listing yields the same id; any added, removed or rewritten file a new one.
    """
    import hashlib

    digest = hashlib.sha256()
    for path, size, identity in sorted(entries):
        digest.update(f"{path}\0{size}\0{identity}\n".encode())
    return digest.hexdigest()[:20]


LISTING_DIGEST = re.compile(r"^[0-9a-f]{20}$")


def pinned_listing_digest(revision: str | None, kind: str) -> str | None:
    """`pinned_revision` of a source whose revision id is a `listing_digest` (a bucket prefix): the id itself, or
    exit 2 for anything else, since a bucket has no branches or tags to resolve."""
    if revision and LISTING_DIGEST.match(revision):
        return revision
    if revision:
        raise UsageError(f"--revision {revision!r} is not a {kind} revision id; it is the 20-hex digest weightsync "
                         "prints after a sync (pin it for zero-request warm starts); leave it unset to take whatever "
                         "the prefix holds now")
    return None


def listed_snapshot(files: list[RemoteFile], selection: Selection, what: str, hint: str) -> Snapshot:
    """The snapshot of a listed prefix: the files `selection` keeps, under their `listing_digest`; exit 3 when none
    is left (`what`: "objects under gs://b/p"; `hint`: where to look)."""
    kept = [f for f in files if selection.matches(f.path)]
    if not kept:
        raise SourceError(f"no {what}" + (" match the --include/--exclude filters" if selection.key() else "")
                          + f"; {hint}")
    return Snapshot(revision=listing_digest([(f.path, f.size, f.etag or "") for f in kept]), files=tuple(kept))

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
"""HTTP replies a retry may cure: a timeout, too early, throttling, a server error or a gateway's."""


def retry_after(value: str) -> float | None:
    """A Retry-After header in seconds (the delta form; the HTTP-date form is ignored), or None."""
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


def slugify(*parts: str) -> str:
    """A readable directory name for a source: `s3--bucket--models--llama`."""
    text = "--".join(p.strip("/") for p in parts if p.strip("/"))
    text = re.sub(r"[^A-Za-z0-9._-]+", "--", text.replace("/", "--")).strip("-.")
    return text[:200] or "model"


# `s3:/bucket`, `s3:bucket`, `hf:/owner/name`, `S3://...`: a scheme typed wrong, not a folder.
NEAR_MISS = re.compile(r"^(s3|hf|gs|az|oci|file|https?):/?(?!/)(.+)$", re.IGNORECASE)


def open_source(uri: str, transfer: TransferConfig | None = None, *, addressing_style: str = "auto",
                offline: bool = False, lockfile: PinnedFiles | None = None) -> Source:
    """Pick the backend from the URI scheme: s3://, hf://, gs://, az:// or an Azure blob https:// URL, oci://,
    file://, a plain path, or any other http(s):// URL (timeouts and pool sizes from `transfer`, the defaults
    unless given). `lockfile` names the files of an https:// base URL, which a web server cannot list."""
    transfer = transfer or DEFAULTS
    if uri.startswith("az://") or uri[:8].lower() == "https://":  # Azure's https:// URLs before any other https
        from weightsync.sources.azure import AzureSource, is_azure_blob_url

        if uri.startswith("az://") or is_azure_blob_url(uri):
            return AzureSource.from_uri(uri, transfer)
    if uri.startswith("s3://"):
        from weightsync.sources.s3 import S3Source

        return S3Source.from_uri(uri, transfer, addressing_style=addressing_style)
    if uri.startswith("hf://"):
        from weightsync.sources.hf import HubSource

        return HubSource.from_uri(uri, transfer, offline=offline)
    if uri.startswith("gs://"):
        from weightsync.sources.gcs import GcsSource

        return GcsSource.from_uri(uri, transfer)
    if uri.startswith(("oci://", "oci+http://")):
        from weightsync.sources.oci import OciSource

        return OciSource.from_uri(uri, transfer)
    near_miss = NEAR_MISS.match(uri)
    if near_miss:
        scheme, rest = near_miss.group(1).lower(), near_miss.group(2).split("?", 1)[0]  # a query is never shown
        article = "an" if scheme in ("s3", "hf", "az", "oci", "file", "http", "https") else "a"  # an ess-three
        raise UsageError(f"--source {uri.split('?', 1)[0]!r} looks like {article} {scheme}:// URI with a slash "
                         f"missing; did you mean {scheme}://{rest}?")
    if uri.startswith("file://") or "://" not in uri:
        from weightsync.sources.file import FileSource

        return FileSource.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    if scheme.lower() in ("https", "http"):  # the generic fallback: more specific https hosts are matched above
        from weightsync.sources.https import HttpsSource

        return HttpsSource.from_uri(uri, transfer, lockfile=lockfile)
    raise UsageError(f"unsupported source scheme '{scheme}://' in --source {uri.split('?', 1)[0]!r}; "
                     "use s3://bucket/prefix, hf://owner/name, gs://bucket/prefix, az://account/container/prefix, "
                     "oci://registry/repo:tag, https://host/path, file:///abs/path or a directory")
