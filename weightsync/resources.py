"""What this process may use: CPUs and memory from its cgroup (v2 or v1), and the worker plan they allow.

A pod's limits, not the node's size, decide how many streams and how much buffer
memory a sync can afford; reading them here keeps a 1-CPU, 512 MiB init container
from starting the workers and buffers that an idle 64-core node would allow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from weightsync.config import TransferConfig


def cgroup_limits(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
                  ) -> tuple[float | None, int | None]:
    """(CPUs, memory bytes) this process's cgroups allow, v2 or v1, the tightest along the path up to
    the root; None for unlimited or unknown."""
    paths: dict[str, str] = {}
    try:
        for line in membership.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path.strip("/")
    except (OSError, ValueError):
        pass

    def tightest(base: Path, controller: str, read: Any) -> Any:
        found = None
        relative = Path(paths.get(controller, ""))
        for directory in dict.fromkeys([base / relative, *(base / parent for parent in relative.parents)]):
            try:
                value = read(directory)
            except (OSError, ValueError, ZeroDivisionError, IndexError):
                continue
            if value is not None and (found is None or value < found):
                found = value
        return found

    def cpu_v2(directory: Path) -> float | None:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)

    def memory_v2(directory: Path) -> int | None:
        value = (directory / "memory.max").read_text().strip()
        return None if value == "max" else int(value)

    def cpu_v1(directory: Path) -> float | None:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        return quota / int((directory / "cpu.cfs_period_us").read_text()) if quota > 0 else None

    def memory_v1(directory: Path) -> int | None:
        value = int((directory / "memory.limit_in_bytes").read_text())
        return value if value < 1 << 60 else None

    cpus = tightest(root, "", cpu_v2)
    memory = tightest(root, "", memory_v2)
    if cpus is None:
        cpus = tightest(root / "cpu", "cpu", cpu_v1)
    if memory is None:
        memory = tightest(root / "memory", "memory", memory_v1)
    return cpus, memory


def usable_cpus(limits: tuple[float | None, int | None] | None = None) -> float:
    """CPUs this process may use: its affinity mask, within the cgroup's CPU quota."""
    cpus = (limits if limits is not None else cgroup_limits())[0]
    try:
        available = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        available = float(os.cpu_count() or 1)
    return min(available, cpus) if cpus else available


def worker_plan(config: TransferConfig, streams_per_cpu: int | None = None,
                limits: tuple[float | None, int | None] | None = None) -> tuple[int, int]:
    """(workers, buffer bytes) for `config.concurrency` concurrent ranges within the cgroup's limits.

    Buffers may take 1/16 of a memory limit (the interpreter and the kernel's
    dirty page cache need the rest): buffers shrink first, down to min_buffer_size, then
    the number of workers. A source whose reader parses HTTP in Python under the GIL
    sets `streams_per_cpu`: past that many streams per usable CPU,
    each stream only adds GIL contention (on 2 CPUs, 8 streams took 20-25% longer than 4).
    """
    limits = limits if limits is not None else cgroup_limits()
    memory = limits[1]
    workers, buffer = max(1, config.concurrency), config.buffer_size
    if streams_per_cpu:
        workers = min(workers, max(2, int(streams_per_cpu * usable_cpus(limits))))
    if memory is not None:
        budget = max(config.min_buffer_size, memory // 16)
        workers = min(workers, max(1, budget // config.min_buffer_size))
        buffer = max(config.min_buffer_size, min(config.buffer_size, budget // workers // (64 * 1024) * 64 * 1024))
    return workers, buffer
