"""The resume state of one download: which chunks of which version of a file are on disk.

It lives next to the part file as `<id>.json`, is rewritten atomically (never fsynced:
losing it only means downloading again) and is trusted only for the exact same file at
the source (path, size, ETag) cut into the same chunks. Like pip's `_FileDownload`,
it is plain data: the download decides when to save it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from weightsync.fsutil import read_nofollow
from weightsync.sources import RemoteFile

STATE_VERSION = 1
STATE_LIMIT = 1 << 20  # a state file larger than this was not written by weightsync


@dataclass
class ResumeState:
    path: str
    size: int
    etag: str | None
    chunk_size: int
    done: set[int] = field(default_factory=set)
    """Chunks wholly on disk."""
    partial: dict[int, int] = field(default_factory=dict)
    """Started chunks: index -> bytes written from the chunk's start."""
    sha256: str | None = None
    """Set once the whole file was verified (and moved into the staging tree)."""
    chunks: list[tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.chunks = [(start, min(start + self.chunk_size, self.size))
                       for start in range(0, self.size, self.chunk_size)]

    @classmethod
    def fresh(cls, remote: RemoteFile, chunk_size: int) -> ResumeState:
        return cls(path=remote.path, size=remote.size, etag=remote.etag, chunk_size=chunk_size)

    @classmethod
    def load(cls, state_path: Path, remote: RemoteFile, chunk_size: int) -> ResumeState | None:
        """The recorded state if it describes exactly this file cut into `chunk_size` chunks, else None.

        Out-of-range indices and counts are dropped, not trusted: resumed bytes are re-hashed anyway, but a
        state that claims a chunk beyond the file must not make one be skipped.
        """
        try:
            body = json.loads(read_nofollow(state_path, limit=STATE_LIMIT))
            same = (body.get("version") == STATE_VERSION and body.get("path") == remote.path
                    and body.get("size") == remote.size and body.get("etag") == remote.etag
                    and body.get("chunk_size") == chunk_size)
        except (OSError, ValueError, AttributeError):
            return None
        if not same:
            return None
        state = cls.fresh(remote, chunk_size)
        sha256 = body.get("sha256")
        if isinstance(sha256, str) and len(sha256) == 64:
            state.sha256 = sha256
        done, partial = body.get("done"), body.get("partial") or {}
        if isinstance(done, list):
            state.done = {i for i in done if isinstance(i, int) and 0 <= i < len(state.chunks)}
        for index, count in (partial.items() if isinstance(partial, dict) else ()):
            if str(index).isdigit() and isinstance(count, int) and int(index) < len(state.chunks):
                start, end = state.chunks[int(index)]
                if 0 < count < end - start and int(index) not in state.done:
                    state.partial[int(index)] = count
        return state

    def to_json(self) -> bytes:
        return json.dumps({"version": STATE_VERSION, "path": self.path, "size": self.size, "etag": self.etag,
                           "chunk_size": self.chunk_size, "done": sorted(self.done),
                           "partial": {str(i): n for i, n in self.partial.items() if i not in self.done},
                           "sha256": self.sha256}).encode()

    def forget_progress(self) -> None:
        self.done, self.partial, self.sha256 = set(), {}, None

    @property
    def started(self) -> bool:
        return bool(self.done or self.partial)

    @property
    def bytes_on_disk(self) -> int:
        whole = sum(self.chunks[i][1] - self.chunks[i][0] for i in self.done)
        return whole + sum(n for i, n in self.partial.items() if i not in self.done)

    def pending(self) -> list[int]:
        return [i for i in range(len(self.chunks)) if i not in self.done]

    def resume_offset(self, index: int) -> int:
        """Where chunk `index` continues: its start plus the bytes a previous run already wrote."""
        return self.chunks[index][0] + self.partial.get(index, 0)

    def recorded_ranges(self) -> list[tuple[int, int]]:
        """The byte ranges this state says are on disk."""
        ranges = [self.chunks[i] for i in sorted(self.done)]
        return ranges + [(self.chunks[i][0], self.chunks[i][0] + n) for i, n in sorted(self.partial.items())
                         if i not in self.done]

    def contiguous_end(self, first: int) -> tuple[int, int]:
        """(end of the contiguous prefix on disk, index of the first chunk not wholly on disk), scanning from
        chunk `first` (all before it are known to be done)."""
        while first in self.done:
            first += 1
        if first == len(self.chunks):
            return self.size, first
        return self.chunks[first][0] + self.partial.get(first, 0), first
