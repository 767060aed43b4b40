"""`weightsync gc`: frees old revisions and abandoned staging, never `current`, a ref'd or a locked revision."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from tests.adversarial.harness import last_path, ws
from tests.support.helpers import tree_bytes


def _three_revisions(tmp_path: Path, env: dict[str, str]) -> tuple[Path, list[Path]]:
    source, dest = tmp_path / "src", tmp_path / "vol"
    source.mkdir()
    published = []
    for version in range(3):
        (source / "config.json").write_text(f'{{"v": {version}}}')
        (source / "w.bin").write_bytes(os.urandom(100_000))
        result = ws("sync", "--source", str(source), "--dest", str(dest), "--name", "m", env=env)
        assert result.returncode == 0, result.stderr
        published.append(last_path(result))
        time.sleep(0.01)
    return dest, published


def test_gc_keeps_current_refs_and_the_newest_and_removes_the_rest(tmp_path, clean_env):
    dest, (a, b, c) = _three_revisions(tmp_path, clean_env)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("not weightsync's")
    os.symlink(tmp_path / "outside", dest / "m" / "revisions" / "planted")
    result = ws("gc", "--dest", str(dest), "--keep", "1", env=clean_env)
    assert result.returncode == 0, result.stderr
    assert not a.exists() and not b.exists() and c.is_dir()
    assert sorted(result.stdout.split()) == sorted([str(a), str(b)])
    assert not (dest / "m" / "manifests" / f"{a.name}.json").exists()
    assert (dest / "m" / "current").resolve() == c
    assert (tmp_path / "outside" / "keep.txt").read_text() == "not weightsync's", "a planted symlink's target"
    assert not os.path.lexists(dest / "m" / "revisions" / "planted")
    verify = ws("verify", "--source", str(tmp_path / "src"), "--dest", str(dest), "--name", "m", env=clean_env)
    assert verify.returncode == 0, verify.stderr


def test_gc_never_removes_a_revision_whose_lock_is_held_or_a_ref_names(tmp_path, clean_env):
    dest, (a, b, c) = _three_revisions(tmp_path, clean_env)
    (dest / "m" / "refs").mkdir(exist_ok=True)
    (dest / "m" / "refs" / "v1").write_text(b.name + "\n")
    lock = dest / "m" / ".locks" / f"{a.name}.lock"
    lock.parent.mkdir(exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a sync (or a repair) of revision a is running
    try:
        result = ws("gc", "--dest", str(dest), "--keep", "0", env=clean_env)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert a.is_dir() and tree_bytes(a), "in use by a lock holder"
    assert b.is_dir(), "named by refs/v1"
    assert c.is_dir(), "current"
    assert "in use by" in result.stderr and "refs/v1" in result.stderr
    again = ws("gc", "--dest", str(dest), "--keep", "0", env=clean_env)
    assert again.returncode == 0 and not a.exists()


def test_gc_removes_only_abandoned_unlocked_staging(tmp_path, clean_env):
    dest, _ = _three_revisions(tmp_path, clean_env)
    staging = dest / "m" / ".staging"
    old_time = time.time() - 7200
    for name in ("abandoned", "fresh", "held"):
        (staging / name / "parts").mkdir(parents=True)
        (staging / name / "parts" / "x.part").write_bytes(b"x" * 1000)
    for name in ("abandoned", "held"):
        for path in [*(staging / name).rglob("*"), staging / name]:
            os.utime(path, (old_time, old_time))
    lock = dest / "m" / ".locks" / "held.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = ws("gc", "--dest", str(dest), "--keep", "5", "--staging-older-than", "3600", env=clean_env)
    finally:
        os.close(fd)
    assert result.returncode == 0, result.stderr
    assert not (staging / "abandoned").exists()
    assert (staging / "fresh").is_dir() and (staging / "held").is_dir()
    assert len(list((dest / "m" / "revisions").iterdir())) == 3, "--keep 5 keeps all three"
