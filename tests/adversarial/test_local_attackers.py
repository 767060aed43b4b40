"""Local attackers on a shared volume: planted symlinks are refused or replaced, never followed; files are created
with safe permissions; manifests, state and locks are opened without following symlinks."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.harness import last_path, model, snapshot_outside, ws
from tests.support.helpers import ROOT, error_line, tree_bytes


@pytest.fixture
def setup(hub, hub_env, area):
    root, dest = area
    files = model(71, shards=2, shard_size=300_000)
    commit = hub.add_commit("acme/target", files)
    victim = root / "vol" / "outside-dir" / "victim.txt"
    victim.write_text("precious")
    return root, dest, dest / "hf--acme--target", commit, files, victim


def _sync(dest, env, *extra):
    return ws("sync", "--source", "hf://acme/target", "--dest", str(dest), *extra, env=env)


def _part_id(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:24]


def test_symlink_planted_in_the_staging_tree_is_refused(setup, hub_env):
    root, dest, name_dir, commit, _files, victim = setup
    tree = name_dir / ".staging" / commit / "tree"
    tree.mkdir(parents=True)
    os.symlink(victim.parent, tree / "tokenizer")  # files under tokenizer/ would land in outside-dir
    before = snapshot_outside(root, dest)
    result = _sync(dest, hub_env)
    assert result.returncode == 4, result.stderr
    assert "refusing to write through" in error_line(result) and "tokenizer" in error_line(result)
    assert snapshot_outside(root, dest) == before
    assert victim.read_text() == "precious" and sorted(os.listdir(victim.parent)) == ["victim.txt"]


@pytest.mark.parametrize("where", ["staging", "revisions", "name"])
def test_symlinked_volume_directories_are_refused(setup, hub_env, where):
    root, dest, name_dir, _commit, _files, victim = setup
    if where == "name":
        os.symlink(victim.parent, name_dir)
    else:
        name_dir.mkdir()
        target = {"staging": name_dir / ".staging", "revisions": name_dir / "revisions"}[where]
        os.symlink(victim.parent, target)
    before = snapshot_outside(root, dest)
    result = _sync(dest, hub_env)
    assert result.returncode == 4, result.stderr
    assert "refusing to write through" in error_line(result)
    assert snapshot_outside(root, dest) == before


def test_planted_part_state_manifest_lock_and_current_symlinks_are_not_followed(setup, hub_env):
    root, dest, name_dir, commit, files, victim = setup
    parts = name_dir / ".staging" / commit / "parts"
    parts.mkdir(parents=True)
    (name_dir / "manifests").mkdir()
    (name_dir / ".locks").mkdir()
    shard = "model-00001-of-00002.bin"
    planted = [parts / f"{_part_id(shard)}.part", parts / f"{_part_id(shard)}.json",
               name_dir / "manifests" / f"{commit}.json", name_dir / ".locks" / f"{commit}.lock.holder",
               name_dir / "current"]
    for link in planted:
        os.symlink(victim, link)
    before = snapshot_outside(root, dest)
    result = _sync(dest, hub_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(last_path(result)) == files
    assert victim.read_text() == "precious"
    assert snapshot_outside(root, dest) == before
    assert (name_dir / "current").resolve() == last_path(result)


def test_a_symlinked_lock_file_is_not_followed(setup, hub_env):
    root, dest, name_dir, commit, _files, victim = setup
    (name_dir / ".locks").mkdir(parents=True)
    os.symlink(victim, name_dir / ".locks" / f"{commit}.lock")
    before = snapshot_outside(root, dest)
    result = _sync(dest, hub_env, "--lock-timeout", "5")
    assert victim.read_text() == "precious" and snapshot_outside(root, dest) == before
    if result.returncode != 0:  # refusing is fine too, as long as it says why
        assert "lock" in error_line(result)


def test_a_revision_dir_that_is_a_symlink_to_a_lookalike_is_never_handed_out(setup, hub_env, hub):
    _root, dest, name_dir, commit, files, victim = setup
    first = _sync(dest, hub_env)
    assert first.returncode == 0
    lookalike = victim.parent / "lookalike"
    os.rename(name_dir / "revisions" / commit, lookalike)
    (lookalike / "config.json").write_bytes(b"attacker")  # same size would pass a fast check: it must not matter
    os.symlink(lookalike, name_dir / "revisions" / commit)
    result = _sync(dest, hub_env, "--revision", commit)
    assert result.returncode == 0, result.stderr
    published = last_path(result)
    assert not published.is_symlink() and published.resolve().is_relative_to(dest.resolve())
    assert tree_bytes(published) == files
    assert (lookalike / "config.json").read_bytes() == b"attacker", "the lookalike itself is left alone"


def test_files_are_created_without_group_or_world_write_even_with_umask_0(setup, hub_env):
    _root, dest, _name_dir, _commit, _files, _victim = setup
    script = ("import os, sys, runpy; os.umask(0); sys.argv = ['weightsync'] + sys.argv[1:]; "
              "runpy.run_module('weightsync', run_name='__main__')")
    fresh = dest / "fresh"
    result = subprocess.run([sys.executable, "-c", script, "sync", "--source", "hf://acme/target", "--dest",
                             str(fresh), "--lock-mode", "flock"], env=hub_env, capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    loose = []
    for dirpath, dirnames, filenames in os.walk(fresh):
        for name in [*dirnames, *filenames, ""]:
            path = Path(dirpath, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and mode & (stat.S_IWGRP | stat.S_IWOTH):
                loose.append(f"{path.relative_to(fresh)} {oct(mode & 0o777)}")
    assert loose == [], loose


def test_fifos_planted_as_manifest_ref_and_holder_never_hang_a_sync(setup, hub_env):
    """A reader that opens a FIFO blocks until a writer comes: these files are opened non-blocking, regular only."""
    _root, dest, name_dir, commit, files, _victim = setup
    first = _sync(dest, hub_env)
    assert first.returncode == 0, first.stderr
    (name_dir / "manifests" / f"{commit}.json").unlink()
    os.mkfifo(name_dir / "manifests" / f"{commit}.json")
    (name_dir / "refs" / "main").unlink()
    os.mkfifo(name_dir / "refs" / "main")
    (name_dir / ".locks").mkdir(exist_ok=True)
    os.mkfifo(name_dir / ".locks" / f"{commit}.lock.holder")
    offline = ws("sync", "--offline", "--source", "hf://acme/target", "--dest", str(dest), env=hub_env, timeout=60)
    assert offline.returncode in (0, 3), offline.stderr  # no usable ref: a clear refusal, or `current`
    result = _sync(dest, hub_env, "--lock-timeout", "30")
    assert result.returncode == 0, result.stderr
    assert tree_bytes(last_path(result)) == files
