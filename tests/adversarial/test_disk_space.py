"""Full disks: a precheck (exit 6, needed vs free, counting what staging holds) and ENOSPC mid-write (exit 6,
nothing published, staging kept, resume after freeing space). Uses size-limited tmpfs mounts (root only)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import MiB, Proc, model, ws
from tests.support.helpers import error_line, tree_bytes


def _fill(point: Path, leave: int) -> Path:
    """Write a filler file until only about `leave` bytes stay free."""
    filler = point / "filler.bin"
    free = os.statvfs(point).f_bavail * os.statvfs(point).f_frsize
    with open(filler, "wb") as handle:
        remaining = max(0, free - leave)
        block = b"\0" * MiB
        while remaining > 0:
            try:
                remaining -= handle.write(block[: min(len(block), remaining)])
                handle.flush()
            except OSError:
                break
    return filler


def _free(point: Path) -> int:
    stats = os.statvfs(point)
    return stats.f_bavail * stats.f_frsize


def test_precheck_exits_6_with_needed_and_free_bytes(hub, hub_env, small_fs):
    point = small_fs(20)
    files = model(51, shards=3, shard_size=8 * MiB)
    hub.add_commit("acme/big", files)
    result = ws("sync", "--source", "hf://acme/big", "--dest", str(point / "vol"), env=hub_env)
    assert result.returncode == 6, result.stderr
    line = error_line(result)
    needed = sum(map(len, files.values()))
    assert f"({needed} bytes)" in line, line
    free = int(re.search(r"\((\d+) bytes\) free", line).group(1))
    assert 0 < free < needed
    assert not list((point / "vol" / "hf--acme--big").glob("revisions/*"))


@pytest.mark.slow
def test_precheck_counts_what_staging_already_holds(hub, hub_env, small_fs, tmp_path):
    point = small_fs(40)
    files = model(52, shards=3, shard_size=8 * MiB)
    total = sum(map(len, files.values()))
    hub.add_commit("acme/half", files)
    hub.faults.throttle_bps = 4 * MiB
    dest = point / "vol"
    first = Proc("sync", "--source", "hf://acme/half", "--dest", str(dest), env=hub_env, workdir=tmp_path / "logs")
    staging = dest / "hf--acme--half" / ".staging"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(r.bytes_sent for r in hub.requests) < total * 0.6:
        time.sleep(0.05)
    assert first.kill()
    hub.faults.throttle_bps = None
    hub.wait_idle()
    held = sum(r.bytes_sent for r in hub.requests)
    assert staging.exists() and total * 0.4 < held < total, held
    # Leave room for what is missing (less if the part files were preallocated), but not for the whole model:
    # only a precheck that counts what staging holds passes.
    _fill(point, leave=total - held + 2 * MiB)
    assert _free(point) < total
    result = ws("sync", "--source", "hf://acme/half", "--dest", str(dest), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


@pytest.mark.slow
def test_enospc_while_writing_exits_6_publishes_nothing_keeps_staging_and_resumes(hub, hub_env, small_fs,
                                                                                  tmp_path):
    point = small_fs(24)
    files = model(53, shards=3, shard_size=4 * MiB)
    total = sum(map(len, files.values()))
    hub.add_commit("acme/fill", files)
    hub.faults.throttle_bps = 1 * MiB
    dest = point / "vol"
    process = Proc("sync", "--source", "hf://acme/fill", "--dest", str(dest), env=hub_env,
                   workdir=tmp_path / "logs")
    parts = dest / "hf--acme--fill" / ".staging"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(r.bytes_sent for r in hub.requests) < 4 * MiB:
        time.sleep(0.05)
    filler = _fill(point, leave=0)  # another tenant of the volume fills it up completely
    assert process.wait(90) == 6, process.stderr
    line = [line for line in process.stderr.splitlines() if line.startswith("weightsync: error:")]
    assert len(line) == 1 and "filled up" in line[0], process.stderr
    name_dir = dest / "hf--acme--fill"
    assert not (name_dir / "current").exists()
    assert not (name_dir / "revisions").exists() or not list((name_dir / "revisions").iterdir())
    assert list(parts.rglob("*.json")), "staging (resume state) is kept"
    filler.unlink()
    hub.faults.throttle_bps = None
    hub.reset_log()
    again = ws("sync", "--source", "hf://acme/fill", "--dest", str(dest), env=hub_env)
    assert again.returncode == 0, again.stderr
    assert tree_bytes(Path(again.stdout.splitlines()[-1])) == files
    hub.wait_idle()
    refetched = sum(r.bytes_sent for r in hub.requests if r.is_cdn or "/resolve/" in r.path)
    assert refetched < total, "the rerun resumed instead of starting over"
    assert "resumed 0 B" not in again.stderr
