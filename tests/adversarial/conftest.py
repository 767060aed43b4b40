"""Fixtures of the adversarial suite: a local Hub with a secret token, small mounts, a sentinel outside DEST."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.harness import HF_SECRET_TOKEN
from tests.support.hubserver import HubServer


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer()
    server.tokens.add(HF_SECRET_TOKEN)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub: HubServer, clean_env: dict[str, str]) -> dict[str, str]:
    return {**clean_env, **hub.env(), "HF_TOKEN": HF_SECRET_TOKEN, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def fast_retries() -> dict[str, str]:
    """Short backoff so fault tests finish quickly (the retry count stays the default unless a test sets it)."""
    return {"WEIGHTSYNC_RETRY_BASE": "0.05"}


@pytest.fixture
def area(tmp_path: Path) -> tuple[Path, Path]:
    """(root, dest): DEST sits two levels inside `root`, with a sentinel file beside it, so a test can prove
    that nothing outside DEST was written."""
    root = tmp_path / "area"
    dest = root / "vol" / "dest"
    dest.mkdir(parents=True)
    (root / "sentinel.txt").write_text("untouched")
    (root / "vol" / "outside-dir").mkdir()
    return root, dest


def _mount(args: list[str]) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(args, capture_output=True).returncode == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[callable]:
    """A factory of size-limited tmpfs mounts (as root); skips cleanly where mounting is not permitted."""
    mounted: list[Path] = []

    def make(size_mib: int) -> Path:
        point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
        point.mkdir()
        if not _mount(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(point)]):
            pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
        mounted.append(point)
        return point

    yield make
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
