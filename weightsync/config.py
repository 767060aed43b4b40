"""Every tuning default, here once: `TransferConfig` (as s3transfer's), and the names of the modes.

The CLI's defaults, the engine's, every source's and the benchmarks' all come
from `DEFAULTS`; nothing else in weightsync writes a timeout, a size or a count
of its own. Cheap to import (the CLI reads it for `--help`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, TypeAlias

MiB = 1024 * 1024

VerifyMode: TypeAlias = Literal["fast", "full"]
"""Warm-start check: fast = manifest and sizes, full = re-hash every file."""
LockMode: TypeAlias = Literal["auto", "flock", "lease"]
AddressingStyle: TypeAlias = Literal["auto", "path", "virtual"]
Layout: TypeAlias = Literal["native", "hf-cache"]
"""native: DEST/<name>/revisions/<rev> and `current`; hf-cache: DEST is a Hugging Face hub cache (hfcache.py)."""
RevisionKey: TypeAlias = str
"""The directory a revision is published under: the source's revision id, plus the filter set's id when
filtered (`<commit>-<8 hex>`), so two filtered syncs of one revision never share a directory."""


@dataclass(frozen=True)
class TransferConfig:
    """How a sync moves bytes: concurrency, sizes, timeouts, retries, durability.

    Memory, whatever the model's size: `concurrency × buffer_size` for the socket reads,
    plus one `hash_window` per file being hashed where the filesystem cannot be mapped
    (mmap reads the page cache without a copy). Within a cgroup memory limit the buffers
    take at most 1/16 of it: they shrink first, down to `min_buffer_size`, then the
    number of workers (fetch.worker_plan). With the defaults: 8 × 256 KiB = 2 MiB.

    Time: a request silent for `stall_timeout` seconds is retried on a fresh connection
    from where it stopped; `retries` attempts per request, with full-jitter backoff from
    `retry_base` up to `retry_max` seconds; and when no byte has arrived and no request
    succeeded for `no_progress_timeout` seconds, the sync ends with exit 7 (retry.py).
    """

    concurrency: int = 8
    """Ranged GETs in flight, across all files."""
    min_chunk_size: int = 64 * MiB
    """One ranged GET each; resume keeps whole chunks and the written part of each started one."""
    max_chunks_per_file: int = 1024
    """Huge files get larger chunks, so the resume state stays small."""
    buffer_size: int = 256 * 1024
    """Per worker. Small enough to stay in a core's L2 between the socket read, the pwrite and the hash
    (1 MiB buffers cost ~50% more CPU per byte on this project's 1 MiB-L2 machines; benchmarks/README.md)."""
    min_buffer_size: int = 64 * 1024
    hash_window: int = 2 * MiB
    """The hash reads the written prefix back through mappings of this size."""
    catch_up_every: int = 8 * MiB
    """A worker hashes behind the writers every this many bytes it wrote (0: only when a chunk completes)."""
    state_save_bytes: int = 1 * MiB
    state_save_interval: float = 0.1
    """Resume state is saved at most this often while bytes keep coming (after state_save_bytes of them),
    and every state_save_seconds otherwise: a kill loses at most that much."""
    state_save_seconds: float = 1.0
    stall_timeout: float = 30.0
    no_progress_timeout: float = 90.0
    connect_timeout: float = 10.0
    retries: int = 6
    retry_base: float = 0.5
    retry_max: float = 20.0
    lease_timeout: float = 60.0
    """Lease mode: a lease whose heartbeat stopped this long ago is taken over (locking.py)."""
    part_size: int = 32 * MiB
    """`weightsync mirror`: the multipart part size (one part of memory per file in flight; a file of more than
    10,000 parts gets bigger ones). Smaller files are one PutObject."""
    fsync: bool = True
    """Data and directories are fsynced before `current` flips (a node crash never publishes a torn file)."""
    progress_interval: float = 10.0
    """Seconds between progress lines when stderr is not a terminal (0: none)."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool):
                continue
            if not isinstance(value, int | float) or value != value or value < 0:
                raise ValueError(f"TransferConfig.{item.name} must be a number >= 0, not {value!r}")
        if self.concurrency < 1 or self.retries < 1:
            raise ValueError("TransferConfig.concurrency and .retries must be at least 1")
        if not 0 < self.min_buffer_size <= self.buffer_size:
            raise ValueError("TransferConfig.min_buffer_size must be above 0 and at most buffer_size")
        if self.min_chunk_size < self.buffer_size or self.max_chunks_per_file < 1 or self.hash_window < 1:
            raise ValueError("TransferConfig.min_chunk_size must hold a buffer; max_chunks_per_file and "
                             "hash_window must be positive")
        if self.stall_timeout <= 0 or self.connect_timeout <= 0 or self.no_progress_timeout <= 0:
            raise ValueError("TransferConfig timeouts must be above 0")

    def chunk_size_for(self, size: int) -> int:
        """min_chunk_size, or larger (whole MiB) for a file that would need more than max_chunks_per_file."""
        per_chunk = -(-size // self.max_chunks_per_file)
        return max(self.min_chunk_size, -(-per_chunk // MiB) * MiB)

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(item.name for item in fields(cls))


DEFAULTS = TransferConfig()
"""The defaults every part reads. The benchmarks' A/B rows replace it (dataclasses.replace, so a renamed field
fails loudly instead of silently benchmarking the default)."""
