"""Stalls and network faults: never a hang; bounded retries honouring Retry-After; then exit 7 with one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.adversarial.harness import BlackHole, FaultProxy, MiB, model, ws
from tests.support.helpers import error_line, tree_bytes, upload_model
from tests.support.s3server import free_port

QUICK = ("--stall-timeout", "1", "--retries", "3")


@pytest.fixture
def black_hole():
    server = BlackHole()
    yield server
    server.close()


def _gave_up(result, within: float, started: float) -> str:
    assert result.returncode == 7, result.stderr
    line = error_line(result)
    assert "gave up after" in line, line
    assert time.monotonic() - started < within, f"took {time.monotonic() - started:.1f}s"
    return line


# -- S3 -------------------------------------------------------------------------------------------------------
def test_s3_endpoint_that_accepts_and_never_answers_exits_7(s3_env, black_hole, fast_retries, tmp_path):
    env = {**s3_env, **fast_retries, "AWS_ENDPOINT_URL": black_hole.url}
    started = time.monotonic()
    result = ws("sync", "--source", "s3://b/p", "--dest", str(tmp_path), *QUICK, env=env, timeout=90)
    _gave_up(result, 60, started)
    assert black_hole.accepted >= 3


def test_s3_nothing_listening_exits_7(s3_env, fast_retries, tmp_path):
    env = {**s3_env, **fast_retries, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    _gave_up(ws("sync", "--source", "s3://b/p", "--dest", str(tmp_path), *QUICK, env=env, timeout=90), 60, started)


def test_s3_body_that_stops_mid_way_is_retried_and_resumed(s3_server, s3_env, bucket, fast_retries, tmp_path):
    files = model(41, shards=2, shard_size=2 * MiB)
    upload_model(s3_server.client(), bucket, "stall", files)
    proxy = FaultProxy(s3_server.s3_port, stall_after=256 * 1024, stall_times=2)
    try:
        env = {**s3_env, **fast_retries, "AWS_ENDPOINT_URL": proxy.url}
        result = ws("sync", "--source", f"s3://{bucket}/stall", "--dest", str(tmp_path), *QUICK, env=env)
        assert result.returncode == 0, result.stderr
        assert proxy.stalled == 2 and "retrying" in result.stderr
        assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    finally:
        proxy.close()


def test_s3_body_that_always_stalls_gives_up_with_exit_7(s3_server, s3_env, bucket, fast_retries, tmp_path):
    upload_model(s3_server.client(), bucket, "stuck", {"w.bin": b"w" * (1 * MiB)})
    proxy = FaultProxy(s3_server.s3_port, stall_after=256 * 1024, stall_times=-1)
    try:
        env = {**s3_env, **fast_retries, "AWS_ENDPOINT_URL": proxy.url}
        started = time.monotonic()
        result = ws("sync", "--source", f"s3://{bucket}/stuck", "--dest", str(tmp_path), *QUICK, env=env,
                    timeout=90)
        line = _gave_up(result, 60, started)
        assert "w.bin" in line
        name_dir = tmp_path / f"s3--{bucket}--stuck"
        assert not (name_dir / "current").exists() and list((name_dir / ".staging").iterdir()), \
            "nothing published, staging kept for the next run"
    finally:
        proxy.close()


def test_s3_503_slowdown_is_retried_honouring_retry_after(s3_server, s3_env, bucket, fast_retries, tmp_path):
    files = {"config.json": b"{}", "w.bin": b"x" * 4096}
    upload_model(s3_server.client(), bucket, "slow", files)
    proxy = FaultProxy(s3_server.s3_port, slowdown=1, retry_after=2)
    try:
        env = {**s3_env, **fast_retries, "AWS_ENDPOINT_URL": proxy.url}
        started = time.monotonic()
        result = ws("sync", "--source", f"s3://{bucket}/slow", "--dest", str(tmp_path), env=env)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 2.0
        retry = [line for line in result.stderr.splitlines() if "retrying" in line]
        assert retry and "SlowDown" in retry[0] and "in 2.0s" in retry[0], result.stderr
        assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    finally:
        proxy.close()


# -- Hugging Face Hub --------------------------------------------------------------------------------------------
def test_hub_that_accepts_and_never_answers_exits_7(hub_env, black_hole, fast_retries, tmp_path):
    env = {**hub_env, **fast_retries, "HF_ENDPOINT": black_hole.url}
    started = time.monotonic()
    _gave_up(ws("sync", "--source", "hf://acme/x", "--dest", str(tmp_path), *QUICK, env=env, timeout=90), 60,
             started)


def test_hub_nothing_listening_exits_7(hub_env, fast_retries, tmp_path):
    env = {**hub_env, **fast_retries, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    _gave_up(ws("sync", "--source", "hf://acme/x", "--dest", str(tmp_path), *QUICK, env=env, timeout=90), 60,
             started)


def test_hub_cdn_that_stalls_every_body_exits_7(hub, hub_env, fast_retries, tmp_path):
    hub.add_commit("acme/net", {"w.safetensors": b"w" * 300_000, "config.json": b"{}"})
    hub.faults.stall_seconds = 30
    hub.faults.only_paths = {"w.safetensors"}
    started = time.monotonic()
    result = ws("sync", "--source", "hf://acme/net", "--dest", str(tmp_path), *QUICK,
                env={**hub_env, **fast_retries}, timeout=90)
    assert "w.safetensors" in _gave_up(result, 40, started)


def test_hub_body_cut_mid_way_is_resumed(hub, hub_env, fast_retries, tmp_path):
    files = model(42, shards=2, shard_size=3 * MiB)
    hub.add_commit("acme/net", files)
    hub.faults.drop_after_bytes, hub.faults.drop_times = 512 * 1024, 3
    result = ws("sync", "--source", "hf://acme/net", "--dest", str(tmp_path), *QUICK,
                env={**hub_env, **fast_retries})
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    hub.wait_idle()
    served = sum(r.bytes_sent for r in hub.requests if r.is_cdn or "/resolve/" in r.path)
    assert served < 1.1 * sum(map(len, files.values())), "retries resume where the cut happened"


@pytest.mark.parametrize("where", ["listing", "file"])
def test_hub_503_and_429_are_retried_honouring_retry_after(hub, hub_env, fast_retries, tmp_path, where):
    files = {"w.safetensors": b"w" * 100_000, "config.json": b"{}"}
    hub.add_commit("acme/busy", files)
    key, status = ("/api/models/acme/busy/revision", 503) if where == "listing" else ("w.safetensors", 429)
    hub.faults.fail_status, hub.faults.fail_times, hub.faults.retry_after = {key: status}, 1, 2
    started = time.monotonic()
    result = ws("sync", "--source", "hf://acme/busy", "--dest", str(tmp_path), env={**hub_env, **fast_retries})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 2.0
    retry = [line for line in result.stderr.splitlines() if "retrying" in line]
    assert retry and f"HTTP {status}" in retry[0] and "in 2.0s" in retry[0], result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_a_huge_retry_after_is_capped_so_the_sync_stays_bounded():
    from weightsync.retry import RetryPolicy

    policy = RetryPolicy(attempts=3, base_delay=0.1, max_delay=2)
    assert policy.delay(0, retry_after=10**9) <= 6
    assert 1.5 <= policy.delay(0, retry_after=1.5) <= 6
