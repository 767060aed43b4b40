"""The manifest of a published revision: every file's path, size, sha256 and what it was verified by.

It is what `verify` re-hashes against and what a warm start checks (sizes) without
touching the network. The sha256 is computed here from bytes that matched the
source's promise; `verified` records that promise (the evidence), so reports can
say what was really checked. A manifest that does not parse or does not match its schema
is never trusted: the revision is treated as unpublished and re-verified.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from weightsync.checksums import Evidence
from weightsync.fsutil import read_nofollow
from weightsync.layout import check_relative_path

if TYPE_CHECKING:
    from weightsync.signature import SignatureRecord

FORMAT = 1
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(Exception):
    """The manifest file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a published revision: its path, size and sha256, and what it was verified by."""

    path: str
    size: int
    sha256: str
    etag: str | None = None
    evidence: Evidence | None = None  # None in manifests written before evidence was recorded

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if self.etag:
            body["etag"] = self.etag
        if self.evidence:
            body["verified"] = self.evidence.to_json()
        return body


@dataclass
class Manifest:
    """What a published revision holds (manifests/<revision>.json): its source, filters and every file."""

    source: str
    revision: str
    files: list[ManifestEntry]
    ref: str | None = None
    selection: dict[str, list[str]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    signature: SignatureRecord | None = None  # the signature the revision was published under, if one was required
    sources: list[str] = field(default_factory=list)
    """The sync's --source then its --fallback sources, in order, when it had fallbacks (`source` is the one the
    bytes came from): what the name is bound to (engine._check_binding). Empty: `source` alone."""

    @property
    def bound_to(self) -> list[str]:
        """The sources this revision's sync declared to be one model: its primary first."""
        return self.sources or [self.source]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "source": self.source,
            "revision": self.revision,
            "ref": self.ref,
            "selection": self.selection,
            "created": self.created,
            "files": [f.to_json() for f in sorted(self.files, key=lambda f: f.path)],
        }
        if self.signature is not None:
            body["signature"] = self.signature.to_json()
        if self.sources:
            body["sources"] = self.sources
        return json.dumps(body, indent=1, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def load(cls, path: Path) -> Manifest:
        try:
            body = json.loads(read_nofollow(path))
            if body.get("format") != FORMAT:
                raise ManifestError(f"unknown manifest format {body.get('format')!r}")
            if path.name.endswith(".json") and body["revision"] != path.name[: -len(".json")]:
                raise ManifestError(f"it describes revision {body['revision']!r}, not {path.name[:-5]!r} "
                                    "(copied or tampered with?)")
            entries = []
            seen: set[str] = set()
            origin = str(path)
            for item in body["files"]:
                entry = ManifestEntry(path=item["path"], size=item["size"], sha256=item["sha256"],
                                      etag=item.get("etag"), evidence=Evidence.from_json(item.get("verified")))
                if (not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0
                        or not isinstance(entry.sha256, str) or not SHA256.match(entry.sha256)):
                    raise ManifestError(f"bad entry for {entry.path!r}")
                if not isinstance(entry.path, str) or entry.path in seen:
                    raise ManifestError(f"bad or duplicate entry for {entry.path!r}")
                check_relative_path(entry.path, origin)
                seen.add(entry.path)
                entries.append(entry)
            signature = None
            if body.get("signature") is not None:  # only a signed model's manifest needs signature.py
                from weightsync.signature import SignatureRecord

                signature = SignatureRecord.from_json(body["signature"])
            sources = body.get("sources") or []
            if not isinstance(sources, list) or not all(isinstance(uri, str) for uri in sources):
                raise ManifestError(f"bad sources {sources!r}")
            return cls(source=body["source"], revision=body["revision"], files=entries, ref=body.get("ref"),
                       sources=sources,
                       selection=body.get("selection") or {}, created=float(body.get("created", 0)),
                       signature=signature)
        except FileNotFoundError as exc:
            raise ManifestError(f"{path} is missing") from exc
        except ManifestError:
            raise
        except Exception as exc:
            raise ManifestError(f"{path} is malformed: {exc}") from exc
