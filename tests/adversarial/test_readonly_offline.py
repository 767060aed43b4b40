"""Read-only volumes: a complete pinned model starts with no write, no lock and no request."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.adversarial.harness import model, remount_readonly, snapshot_outside, ws
from tests.support.helpers import error_line, tree_bytes, upload_model

PROBE = "import os; print('MODEL_DIR=' + os.environ['MODEL_DIR'])"


def test_hf_pinned_model_on_a_read_only_mount_runs_without_writing_or_asking(hub, hub_env, small_fs):
    point = small_fs(16)
    files = model(61, shards=2, shard_size=1024 * 1024)
    first = hub.add_commit("acme/ro", files)
    second = hub.add_commit("acme/ro", {"config.json": b'{"v": 2}'})
    dest = point / "vol"
    for commit in (first, second):  # `current` ends at `second`
        assert ws("sync", "--source", "hf://acme/ro", "--revision", commit, "--dest", str(dest),
                  env=hub_env).returncode == 0
    remount_readonly(point)
    before = snapshot_outside(point, point / "nothing")
    hub.reset_log()
    for commit in (second, first):  # also the revision `current` does not point at: it is not flipped
        result = ws("run", "--source", "hf://acme/ro", "--revision", commit, "--dest", str(dest), "--",
                    sys.executable, "-c", PROBE, env=hub_env)
        assert result.returncode == 0, result.stderr
        model_dir = Path(result.stdout.strip().splitlines()[-1].removeprefix("MODEL_DIR="))
        assert model_dir == dest / "hf--acme--ro" / "revisions" / commit
    assert tree_bytes(dest / "hf--acme--ro" / "revisions" / first) == files
    hub.wait_idle()
    assert hub.requests == [], "a pinned, complete model needs no request"
    assert snapshot_outside(point, point / "nothing") == before, "nothing on the volume changed"


def test_offline_unpinned_on_a_read_only_mount_uses_the_recorded_ref(hub, hub_env, small_fs):
    point = small_fs(8)
    files = {"config.json": b"{}", "w.safetensors": b"w" * 50_000}
    hub.add_commit("acme/ro2", files)
    dest = point / "vol"
    assert ws("sync", "--source", "hf://acme/ro2", "--dest", str(dest), env=hub_env).returncode == 0
    remount_readonly(point)
    hub.stop()
    result = ws("sync", "--offline", "--source", "hf://acme/ro2", "--dest", str(dest), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_s3_pinned_model_on_a_read_only_mount_makes_no_request(s3_server, bucket, s3_env, s3_proxy, small_fs):
    point = small_fs(8)
    files = {"config.json": b"{}", "w.bin": b"w" * 70_000}
    upload_model(s3_server.client(), bucket, "ro", files)
    dest = point / "vol"
    first = ws("sync", "--source", f"s3://{bucket}/ro", "--dest", str(dest), env=s3_env)
    assert first.returncode == 0, first.stderr
    revision = Path(first.stdout.splitlines()[-1]).name
    remount_readonly(point)
    s3_proxy.stats.reset()
    result = ws("run", "--source", f"s3://{bucket}/ro", "--revision", revision, "--dest", str(dest), "--",
                sys.executable, "-c", PROBE, env=s3_env)
    assert result.returncode == 0, result.stderr
    assert s3_proxy.stats.connections == 0


def test_a_missing_model_on_a_read_only_mount_fails_clearly(hub, hub_env, small_fs):
    point = small_fs(4)
    hub.add_commit("acme/absent", {"config.json": b"{}"})
    (point / "vol").mkdir()
    remount_readonly(point)
    result = ws("sync", "--source", "hf://acme/absent", "--dest", str(point / "vol"), env=hub_env)
    assert result.returncode == 2, result.stderr  # a configuration error: the first sync needs a writable mount
    line = error_line(result)
    assert "mounted read-only" in line and "read-write for the first sync" in line, line
