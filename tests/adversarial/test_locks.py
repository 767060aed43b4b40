"""Lock robustness: a timeout names the holder, a dead holder never blocks, broken flock falls back to a lease."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import MiB, Proc, model, ws
from tests.support.helpers import error_line, tree_bytes
from weightsync import locking


@pytest.fixture
def repo(hub):
    files = model(31, shards=2, shard_size=1 * MiB)
    commit = hub.add_commit("acme/locks", files)
    return files, commit


def _hold(env, dest, tmp_path, mode="auto", extra=()):
    holder = Proc("sync", "--source", "hf://acme/locks", "--dest", str(dest), "--lock-mode", mode, *extra,
                  env={**env, "WEIGHTSYNC_TEST_PAUSE_AT": "locked"}, workdir=tmp_path / "logs")
    assert holder.wait_for("paused at locked"), holder.stderr
    return holder


@pytest.mark.parametrize("mode", ["flock", "lease"])
def test_lock_timeout_exits_5_naming_the_holder_and_a_killed_holder_never_blocks(hub, hub_env, repo, tmp_path,
                                                                                 mode):
    files, _ = repo
    dest = tmp_path / "vol"
    holder = _hold(hub_env, dest, tmp_path, mode, ("--lease-timeout", "2"))
    waiter = ws("sync", "--source", "hf://acme/locks", "--dest", str(dest), "--lock-mode", mode,
                "--lease-timeout", "2", "--lock-timeout", "1", env=hub_env)
    assert waiter.returncode == 5, waiter.stderr
    line = error_line(waiter)
    assert f"host {socket.gethostname()} pid {holder.pid}" in line, line
    assert "--lock-timeout" in line
    holder.kill()
    started = time.monotonic()
    after = ws("sync", "--source", "hf://acme/locks", "--dest", str(dest), "--lock-mode", mode,
               "--lease-timeout", "2", "--lock-timeout", "30", env=hub_env)
    assert after.returncode == 0, after.stderr
    assert tree_bytes(Path(after.stdout.splitlines()[-1])) == files
    if mode == "flock":
        assert time.monotonic() - started < 15, "the kernel drops a dead holder's flock at once"
    else:
        assert "took over the stale lease" in after.stderr and f"pid {holder.pid}" in after.stderr


def test_a_live_lease_is_never_taken_over(hub, hub_env, repo, tmp_path):
    dest = tmp_path / "vol"
    holder = _hold(hub_env, dest, tmp_path, "lease", ("--lease-timeout", "1"))
    waiter = ws("sync", "--source", "hf://acme/locks", "--dest", str(dest), "--lock-mode", "lease",
                "--lease-timeout", "1", "--lock-timeout", "4", env=hub_env)
    assert waiter.returncode == 5, waiter.stderr
    assert f"pid {holder.pid}" in error_line(waiter)
    assert "took over" not in waiter.stderr, "the heartbeat kept the lease alive"
    holder.kill()


@pytest.mark.slow
def test_a_frozen_lease_holder_is_taken_over_and_exits_when_it_wakes_up(hub, hub_env, tmp_path):
    files = model(32, shards=2, shard_size=4 * MiB)
    hub.add_commit("acme/frozen", files)
    hub.faults.throttle_bps = 1 * MiB
    dest = tmp_path / "vol"
    args = ("sync", "--source", "hf://acme/frozen", "--dest", str(dest), "--lock-mode", "lease", "--lease-timeout", "2")
    message = tmp_path / "termination-log"
    frozen = Proc(*args, "--termination-log", str(message), env=hub_env, workdir=tmp_path / "logs")
    lease = dest / "hf--acme--frozen" / ".locks"
    deadline = time.monotonic() + 30
    while not list(lease.glob("*.lease")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    os.kill(frozen.pid, signal.SIGSTOP)  # a pod frozen by the node (cgroup freezer, swap storm, VM pause)
    hub.faults.throttle_bps = None
    taker = ws(*args, env=hub_env, timeout=60)
    assert taker.returncode == 0, taker.stderr
    assert "took over the stale lease" in taker.stderr and f"pid {frozen.pid}" in taker.stderr
    os.kill(frozen.pid, signal.SIGCONT)
    assert frozen.wait(30) == 5, frozen.stderr
    # Reported by the main path like any failure (no os._exit from the heartbeat thread): the one error line
    # last, and the Kubernetes termination message.
    assert "lost the lease" in frozen.stderr.strip().splitlines()[-1]
    assert json.loads(message.read_text())["exit_code"] == 5
    assert tree_bytes(Path(taker.stdout.splitlines()[-1])) == files
    verify = ws("verify", "--source", "hf://acme/frozen", "--dest", str(dest), env=hub_env)
    assert verify.returncode == 0, verify.stderr


def test_a_stale_lease_of_another_host_is_taken_over_and_logged(hub, hub_env, repo, tmp_path):
    files, commit = repo
    locks = tmp_path / "vol" / "hf--acme--locks" / ".locks"
    locks.mkdir(parents=True)
    (locks / f"{commit}.lease").write_text(json.dumps({"host": "node-gone-7", "pid": 4242, "since": time.time(),
                                                       "token": "x", "beat": 17}))
    result = ws("sync", "--source", "hf://acme/locks", "--dest", str(tmp_path / "vol"), "--lock-mode", "lease",
                "--lease-timeout", "1", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert "took over the stale lease" in result.stderr
    assert "host node-gone-7 pid 4242" in result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    assert not list(locks.glob("*.lease*")), "the lease is released after publishing"


def test_flock_probe_detects_a_filesystem_whose_locks_do_not_exclude(tmp_path, monkeypatch):
    """The probe takes the lock in this process and again from a forked child."""
    locking._probe_cache.clear()
    assert locking.flock_excludes(tmp_path) is True
    # A FUSE / object-store mount that grants every lock: flock() succeeds and excludes nobody.
    other = tmp_path / "fuse-like"
    other.mkdir()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)
    locking._probe_cache.clear()
    assert locking.flock_excludes(other) is False
    lock = other / "r.lock"
    with locking.volume_lock(lock, timeout=1, what="test", mode="auto", lease_timeout=5):
        assert (other / "r.lease").exists(), "auto mode fell back to the lease"
        record = json.loads((other / "r.lease").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(locking.LockTimeoutError, match=f"pid {os.getpid()}"), \
                locking.volume_lock(lock, timeout=0.3, what="test", mode="auto", lease_timeout=5):
            pass
    assert not (other / "r.lease").exists()
    locking._probe_cache.clear()


def test_lock_files_are_never_opened_through_a_symlink_and_filelock_is_new_enough(tmp_path, monkeypatch):
    from importlib.metadata import version

    installed = tuple(int(p) for p in version("filelock").split(".")[:3])
    assert installed >= (3, 20, 1), "filelock < 3.20.1 follows symlinks when opening lock files (CVE-2025-68146)"
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"filelock>=3.20.1"' in pyproject
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.20.0")
    with pytest.raises(locking.WeightsyncError, match=r"filelock 3\.20\.0 is too old"):
        locking.check_filelock_version()
