"""What a source promises about a file's bytes, and the one pass that checks it.

A source describes each file with the checksums it can vouch for (`Promise`): S3's
ChecksumCRC64NVME / CRC32 / CRC32C / SHA1 / SHA256 (full-object, or COMPOSITE over
the upload's parts), an ETag that is an MD5 (single-part) or an MD5 of part MD5s
(multipart), uploader metadata, the Hub's LFS sha256 and git blob ids, a lockfile's
sha256. `choose` keeps the cheapest one that can be honoured; a `Verifier` then
computes it over every byte in the same pass as the sha256 the manifest records.

Internal logic:
- sha256 of the whole file is always computed: the manifest, `verify`, lockfiles and
  reuse across revisions key on it. It is *our* hash, not a promise, unless a source
  promised that very value.
- A composite checksum is the checksum of the concatenated part checksums, each part
  taken over the server's own part boundaries (`Promise.layout`, from the server,
  never guessed: parts need not be equal). A multipart ETag is the same construction
  with MD5, printed in hex with `-N`.
- The costs below are the CPU-seconds per GiB each check adds to the sha256, on one
  core of this project's machines (benchmarks/checks.py; the table is in
  benchmarks/README.md). A full-object sha256 promise costs nothing extra.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from weightsync.errors import IntegrityError


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A running CRC behind hashlib's update/digest interface (big-endian, as S3 encodes it)."""

    __slots__ = ("_function", "_value", "_width")

    def __init__(self, function: Callable[[Any, int], int], width: int) -> None:
        self._function, self._width, self._value = function, width, 0

    def update(self, data: bytes | memoryview) -> None:
        self._value = self._function(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


def _hashlib() -> Any:
    """hashlib, imported on first use: it loads OpenSSL (~4 ms), and a warm start hashes nothing."""
    import hashlib

    return hashlib


def _zlib_crc32() -> Callable[[Any, int], int]:
    """zlib's CRC32, imported on first use like hashlib (a shared library to load; a warm start checks no CRC)."""
    import zlib

    return zlib.crc32


def _awscrt(name: str) -> Callable[[Any, int], int]:
    """CRC32C and CRC64/NVME from awscrt (hardware-accelerated), imported on first use only."""
    from awscrt import checksums

    return getattr(checksums, name)


@dataclass(frozen=True)
class Algorithm:
    """A checksum weightsync can compute: its name in promises, its cost, a fresh digest."""

    name: str
    cost: float  # extra CPU-s per GiB over the sha256, on one core (benchmarks/checks.py)
    new: Callable[[int], _Digest]  # argument: the file's size (git's blob header needs it)


def _git_blob(size: int) -> _Digest:
    digest = _hashlib().sha1(usedforsecurity=False)
    digest.update(f"blob {size}\0".encode())
    return digest


ALGORITHMS: dict[str, Algorithm] = {algorithm.name: algorithm for algorithm in (
    # CPU s/GiB on top of the sha256, medians of benchmarks/checks.py (2026-12-01, benchmarks/README.md). The
    # CRCs come from whichever library measured fastest: awscrt for CRC64NVME/CRC32C (hardware), zlib for
    # CRC32 (awscrt's ran at half its speed); google-crc32c needs a bytes copy of every buffer.
    Algorithm("crc64nvme", 0.02, lambda _: _Crc(_awscrt("crc64nvme"), 8)),
    Algorithm("crc32c", 0.02, lambda _: _Crc(_awscrt("crc32c"), 4)),
    Algorithm("crc32", 0.16, lambda _: _Crc(_zlib_crc32(), 4)),
    Algorithm("sha1", 0.51, lambda _: _hashlib().sha1(usedforsecurity=False)),
    Algorithm("git-sha1", 0.51, _git_blob),
    Algorithm("sha256", 0.53, lambda _: _hashlib().sha256()),
    Algorithm("md5", 1.24, lambda _: _hashlib().md5(usedforsecurity=False)),
)}

HEX = re.compile(r"[0-9a-f]+")
"""A promise's value: lowercase hex digits, at least one."""

# Which promise wins a tie in cost: one the user pinned, then a server-computed checksum, then the ETag,
# then what an uploader wrote into user metadata.
ORIGIN_RANK = {"lockfile": 0, "source": 1}


@dataclass(frozen=True)
class Promise:
    """One checksum a source vouches for.

    `value` is the hex of the digest over the whole object, or, when `parts` > 0, of
    the digest of the concatenated part digests. `layout` holds the part sizes as the
    server reports them (filled in by the source's describe step); `part_values` each
    part's digest where the server lists them. `field` says where it came from
    (`ChecksumCRC32`, `ETag`, `x-amz-meta-sha256`, `lfs`, `git blob id`, `sha256`).
    `unusable` is why it cannot be honoured, "" when it can.
    """

    algorithm: str
    value: str
    field: str
    parts: int = 0
    layout: tuple[int, ...] = ()
    part_values: tuple[str, ...] = ()
    origin: str = "source"
    unusable: str = ""

    @property
    def usable(self) -> bool:
        return not self.unusable and (not self.parts or len(self.layout) == self.parts)

    @property
    def what(self) -> str:
        if not self.parts:
            return self.algorithm
        if self.field == "ETag":
            return f"multipart etag, {self.parts} parts"
        return f"{self.algorithm} composite, {self.parts} parts"

    @property
    def label(self) -> str:
        """How reports name this evidence: `crc32 composite, 3 parts (source)`."""
        return f"{self.what} ({self.origin})"

    @property
    def group(self) -> str:
        """The label without the part count, for tallies: `crc32 composite (source)`."""
        if not self.parts:
            return self.label
        return f"{'multipart etag' if self.field == 'ETag' else self.algorithm + ' composite'} ({self.origin})"

    @property
    def kind(self) -> str:
        """A short, bounded id for metrics labels: `crc32-composite`, `md5-multipart`, `sha256`."""
        if not self.parts:
            return self.algorithm
        return f"{self.algorithm}-multipart" if self.field == "ETag" else f"{self.algorithm}-composite"

    @property
    def cost(self) -> float:
        if self.algorithm == "sha256" and not self.parts:
            return 0.0  # the whole-file sha256 is computed anyway
        return ALGORITHMS[self.algorithm].cost

    @property
    def shown(self) -> str:
        """The value as the source prints it: base64 for S3 checksums, hex elsewhere; `-N` for parts."""
        text = self.value
        if self.field.startswith("Checksum"):
            import base64

            text = base64.b64encode(bytes.fromhex(self.value)).decode()
        return f"{text}-{self.parts}" if self.parts else text

    def with_layout(self, layout: tuple[int, ...], part_values: tuple[str, ...] = ()) -> Promise:
        return Promise(self.algorithm, self.value, self.field, self.parts, layout, part_values, self.origin,
                       self.unusable)

    def void(self, reason: str) -> Promise:
        return Promise(self.algorithm, self.value, self.field, self.parts, self.layout, self.part_values,
                       self.origin, reason)

    def same_claim(self, other: Promise) -> bool:
        """Whether two promises vouch for the same bytes in the same way (lockfile checks)."""
        return (self.algorithm, self.value, self.parts, self.field) == (other.algorithm, other.value, other.parts,
                                                                         other.field)

    def to_json(self) -> dict[str, object]:
        return {"algorithm": self.algorithm, "value": self.value, "parts": self.parts, "field": self.field,
                "origin": self.origin}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Promise:
        algorithm, value, parts = str(body["algorithm"]), str(body["value"]).lower(), int(body.get("parts") or 0)
        if algorithm not in ALGORITHMS or not HEX.fullmatch(value) or parts < 0:
            raise ValueError(f"bad checksum promise {body!r}")
        return cls(algorithm, value, str(body.get("field") or ""), parts, origin=str(body.get("origin") or "source"))


def from_base64(algorithm: str, text: str, field: str) -> Promise | None:
    """An S3 `Checksum*` header (`base64` or `base64-N`) as a Promise; None if it does not parse."""
    encoded, _, count = text.partition("-")
    try:
        import base64

        raw = base64.b64decode(encoded, validate=True)
    except ValueError:  # binascii.Error is one
        return None
    if not raw or (count and not count.isdigit()):
        return None
    return Promise(algorithm, raw.hex(), field, parts=int(count) if count else 0)


def choose(promises: Iterable[Promise]) -> Promise | None:
    """The cheapest promise that can be honoured; None when there is none."""
    usable = [p for p in promises if p.usable]
    if not usable:
        return None
    return min(usable, key=lambda p: (p.cost, ORIGIN_RANK.get(p.origin, 9), p.field == "ETag",
                                      not p.field.startswith("Checksum")))


@dataclass(frozen=True)
class Evidence:
    """What one file was verified against: a promise, or its size alone and why."""

    promise: Promise | None
    reason: str = ""

    @classmethod
    def of(cls, promises: Iterable[Promise]) -> Evidence:
        promises = tuple(promises)
        chosen = choose(promises)
        if chosen is not None:
            return cls(chosen)
        reasons = [p.unusable or f"{p.what} without the server's part layout" for p in promises]
        return cls(None, reasons[0] if reasons else "the source promised nothing")

    @property
    def label(self) -> str:
        return self.promise.label if self.promise else f"size only: {self.reason}"

    @property
    def group(self) -> str:
        return self.promise.group if self.promise else self.label

    @property
    def kind(self) -> str:
        return self.promise.kind if self.promise else "size-only"

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"evidence": self.label, "kind": self.kind}
        if self.promise:
            body["promise"] = self.promise.to_json()
        return body

    @classmethod
    def from_json(cls, body: Any) -> Evidence | None:
        if not isinstance(body, dict) or "evidence" not in body:
            return None
        if body.get("promise"):
            return cls(Promise.from_json(body["promise"]))
        label = str(body["evidence"])
        return cls(None, label.removeprefix("size only: "))


def tally(evidence: Iterable[Evidence | None], by_kind: bool = False) -> dict[str, int]:
    """Files per evidence, part counts left out, most files first (summaries, status, events: a model of
    many shards of many sizes still gives a short line); `by_kind`: per bounded kind, for metrics labels."""
    counts: dict[str, int] = {}
    for item in evidence:
        if by_kind:
            label = item.kind if item else "unrecorded"
        else:
            label = item.group if item else "unrecorded (published by an older weightsync)"
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe_tally(counts: dict[str, int]) -> str:
    """`2 files crc64nvme (source), 1 file size only: the source promised nothing`."""
    from weightsync.logs import counted

    return ", ".join(f"{counted(n, 'file')} {label}" for label, n in counts.items()) or "no files"


@dataclass
class Verifier:
    """sha256 of every byte, plus the chosen promise, fed once with the file's bytes in order."""

    path: str
    size: int
    evidence: Evidence
    sha256: Any = field(default_factory=lambda: _hashlib().sha256())
    _check: _Digest | None = None
    _part: int = 0
    _left_in_part: int = 0
    _part_digests: list[bytes] = field(default_factory=list)
    _seen: int = 0

    def __post_init__(self) -> None:
        promise = self.evidence.promise
        if promise is None or (promise.algorithm == "sha256" and not promise.parts):
            return
        self._check = ALGORITHMS[promise.algorithm].new(self.size)
        if promise.parts:
            self._left_in_part = promise.layout[0]

    @property
    def computed(self) -> tuple[str, ...]:
        """The digests this verifier computes, for reports and benchmarks."""
        promise = self.evidence.promise
        return ("sha256",) if self._check is None or promise is None else ("sha256", promise.algorithm)

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self._seen += len(data)
        promise = self.evidence.promise
        if self._check is None or promise is None:
            return
        if not promise.parts:
            self._check.update(data)
            return
        view = memoryview(data)
        while view:
            if self._left_in_part == 0:
                if self._part + 1 >= promise.parts:
                    return  # more bytes than the layout holds: finish() reports the size
                self._next_part()
                continue
            take = min(self._left_in_part, len(view))
            self._check.update(view[:take])
            self._left_in_part -= take
            view = view[take:]

    def _next_part(self) -> None:
        promise = self.evidence.promise
        assert promise is not None and self._check is not None
        self._part_digests.append(self._check.digest())
        self._part += 1
        self._check = ALGORITHMS[promise.algorithm].new(self.size)
        self._left_in_part = promise.layout[self._part]

    def finish(self) -> str:
        """The file's sha256 once every byte matched the promise; IntegrityError otherwise."""
        if self._seen != self.size:
            raise IntegrityError(f"size mismatch for {self.path}: expected {self.size} bytes, got {self._seen}",
                                 path=self.path, expected=self.size, got=self._seen)
        sha256 = self.sha256.hexdigest()
        promise = self.evidence.promise
        if promise is None:
            return sha256
        if self._check is None:
            got = sha256
        elif not promise.parts:
            got = self._check.digest().hex()
        else:
            while self._part + 1 < promise.parts:  # trailing empty parts
                self._next_part()
            digests = [*self._part_digests, self._check.digest()]
            self._check_parts(promise, digests)
            combined = ALGORITHMS[promise.algorithm].new(self.size)
            for digest in digests:
                combined.update(digest)
            got = combined.digest().hex()
        if got != promise.value:
            shown = Promise(promise.algorithm, got, promise.field, promise.parts).shown
            raise self._mismatch(promise, f"the bytes received give {shown}", got=shown)
        return sha256

    def _check_parts(self, promise: Promise, digests: list[bytes]) -> None:
        """Name the first damaged part when the server listed each part's checksum."""
        if len(promise.part_values) != promise.parts:
            return
        start = 0
        for index, (size, expected, digest) in enumerate(zip(promise.layout, promise.part_values, digests,
                                                             strict=True)):
            if digest.hex() != expected:
                raise self._mismatch(promise, f"part {index + 1} of {promise.parts} (bytes {start}-{start + size - 1})"
                                     " does not match its part checksum")
            start += size

    def _mismatch(self, promise: Promise, detail: str, got: str | None = None) -> IntegrityError:
        return IntegrityError(
            f"checksum mismatch for {self.path}: the source promised {promise.what} {promise.shown} "
            f"({promise.field or promise.origin}), {detail}; the file was discarded and nothing was published — "
            "rerun; if it persists the object at the source is corrupt",
            path=self.path, expected=promise.shown, got=got,
        )


@dataclass(frozen=True)
class Verified:
    """A file whose every byte matched its evidence; `sha256` is computed here, for the manifest."""

    sha256: str
    evidence: Evidence
    computed: tuple[str, ...] = ("sha256",)


READ_BLOCK = 8 * 1024 * 1024


def feed_file(path: Any, update: Callable[[bytes], object]) -> None:
    """Feed a file on disk to `update` in large blocks: the one loop for every re-check from disk."""
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(READ_BLOCK):
            update(block)


def verify_path(path: Any, name: str, size: int, evidence: Evidence) -> Verified:
    """Check a file already on disk (staged by an earlier run, or reused) against `evidence`, in one read."""
    verifier = Verifier(name, size, evidence)
    feed_file(path, verifier.update)
    return Verified(verifier.finish(), evidence, verifier.computed)
