"""Bounded failure with the settings users run: no timeout flag, no retry flag, no test-only backoff.

test_network_faults.py proves the mechanisms with short values; this file proves the defaults:
a dead endpoint or a dead body ends in exit 7 with one line within two minutes, a slow but moving
transfer keeps going, a stalled range resumes on a fresh connection, and a bad --dest is refused at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import BlackHole, FaultProxy, MiB, model
from tests.support.helpers import error_line, tree_bytes, upload_model, weightsync_popen
from tests.support.s3server import free_port

pytestmark = pytest.mark.slow
TWO_MINUTES = 120.0


def finish(process: subprocess.Popen[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_with_default_settings_every_kind_of_hang_ends_in_exit_7_within_two_minutes(
        s3_server, s3_env, bucket, hub_env, clean_env, tmp_path):
    """Hangs side by side, each with no flag but --source and --dest: an endpoint of every source (S3, the Hub,
    GCS, Azure, an OCI registry, a web server) that accepts and never answers, and an S3 GET body that dies
    after 4 MiB and never sends again."""
    files = {"model.safetensors": os.urandom(24 * MiB), "config.json": b"{}"}
    upload_model(s3_server.client(), bucket, "dies", files)
    holes = {kind: BlackHole() for kind in ("s3", "hf", "gs", "az", "oci", "https")}
    dying = FaultProxy(s3_server.s3_port, dead_after=4 * MiB)
    azure = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
             f"BlobEndpoint={holes['az'].url}/devstoreaccount1;")
    try:
        cases = {
            "s3 endpoint": ({**s3_env, "AWS_ENDPOINT_URL": holes["s3"].url}, "s3://b/p"),
            "hub endpoint": ({**hub_env, "HF_ENDPOINT": holes["hf"].url}, "hf://acme/hung"),
            "gcs endpoint": ({**clean_env, "STORAGE_EMULATOR_HOST": holes["gs"].url}, "gs://b/p"),
            "azure endpoint": ({**clean_env, "AZURE_STORAGE_CONNECTION_STRING": azure}, "az://devstoreaccount1/c/p"),
            "oci registry": (clean_env, f"oci://{holes['oci'].url.removeprefix('http://')}/acme/hung:v1"),
            "web server": (clean_env, f"{holes['https'].url}/m/model.safetensors#sha256={'0' * 64}"),
            "s3 body": ({**s3_env, "AWS_ENDPOINT_URL": dying.url}, f"s3://{bucket}/dies"),
        }
        started = time.monotonic()
        running = {name: weightsync_popen("sync", "--source", source, "--dest", str(tmp_path / name), env=env)
                   for name, (env, source) in cases.items()}
        for name, process in running.items():
            result = finish(process)
            elapsed = time.monotonic() - started
            print(f"default bounds: {name} hang ended with exit {result.returncode} after {elapsed:.0f}s")
            assert result.returncode == 7, f"{name}:\n{result.stderr}"
            assert elapsed < TWO_MINUTES, f"{name} took {elapsed:.0f}s"
            line = error_line(result)
            assert "nothing arrived for" in line or "gave up after" in line, line
        assert dying.bytes_down == 4 * MiB
        assert not list((tmp_path / "s3 body").glob("*/revisions/*")), "nothing is published"
    finally:
        for server in (*holes.values(), dying):
            server.close()


def test_with_default_settings_nothing_listening_exits_7_quickly(s3_env, tmp_path):
    env = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = finish(weightsync_popen("sync", "--source", "s3://b/p", "--dest", str(tmp_path), env=env))
    assert result.returncode == 7, result.stderr
    assert "gave up after 6 attempts" in error_line(result)
    assert time.monotonic() - started < 60


def test_with_default_settings_a_slow_but_moving_transfer_keeps_going(s3_server, s3_env, s3_proxy, bucket,
                                                                      tmp_path):
    """100 KiB/s for longer than the no-progress timeout's share of a stall: never mistaken for a hang."""
    files = {"weights.bin": os.urandom(4 * MiB + 12345), "config.json": b"{}"}
    upload_model(s3_server.client(), bucket, "slow", files)
    s3_proxy.faults.throttle_bps = 100 * 1024
    started = time.monotonic()
    result = finish(weightsync_popen("sync", "--source", f"s3://{bucket}/slow", "--dest", str(tmp_path),
                                     env=s3_env))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started > 30, "the throttle was in force"
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_with_default_settings_a_stalled_range_resumes_on_a_fresh_connection(s3_server, s3_env, bucket, tmp_path):
    files = {"weights.bin": os.urandom(12 * MiB), "config.json": b"{}"}
    upload_model(s3_server.client(), bucket, "stall", files)
    proxy = FaultProxy(s3_server.s3_port, stall_after=4 * MiB, stall_times=1)
    try:
        result = finish(weightsync_popen("sync", "--source", f"s3://{bucket}/stall", "--dest", str(tmp_path),
                                         "--log-format", "json", env={**s3_env, "AWS_ENDPOINT_URL": proxy.url}))
        assert result.returncode == 0, result.stderr
        assert proxy.stalled == 1
        retries = [json.loads(line) for line in result.stderr.splitlines() if '"event": "retry"' in line]
        assert retries and all(r["of"] == 6 for r in retries)
        assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
        # Resumed where it stopped: the 4 MiB before the stall crossed the wire once.
        assert proxy.bytes_down < sum(map(len, files.values())) + 1 * MiB
    finally:
        proxy.close()


# -- bad destinations ---------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name, data in model(7, shards=1, shard_size=64 * 1024).items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    return source


def sync_into(dest: Path, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return finish(weightsync_popen("sync", "--source", str(folder), "--dest", str(dest), env=env))


def test_a_dest_that_is_a_regular_file_exits_2(folder, tmp_path, clean_env):
    dest = tmp_path / "volume"
    dest.write_text("not a volume")
    result = sync_into(dest, folder, clean_env)
    assert result.returncode == 2
    assert "is not a directory" in error_line(result)
    assert dest.read_text() == "not a volume"


def test_a_dest_that_is_a_dangling_symlink_exits_2(folder, tmp_path, clean_env):
    dest = tmp_path / "volume"
    dest.symlink_to(tmp_path / "unmounted")
    result = sync_into(dest, folder, clean_env)
    assert result.returncode == 2
    assert "which does not exist" in error_line(result)
    assert not (tmp_path / "unmounted").exists()


def test_a_dest_this_process_cannot_write_exits_2_naming_fsgroup(folder, tmp_path, clean_env):
    dest = tmp_path / "volume"
    dest.mkdir()
    # root ignores modes: an immutable directory (chattr +i) refuses even root, as a foreign-owned one would
    # refuse a pod's non-root user.
    if subprocess.run(["chattr", "+i", str(dest)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        result = sync_into(dest, folder, clean_env)
    finally:
        subprocess.run(["chattr", "-i", str(dest)], check=True)
    assert result.returncode == 2
    assert "is not writable by this process" in error_line(result) and "fsGroup" in error_line(result)


def test_a_read_only_dest_without_the_model_exits_2(folder, tmp_path, clean_env):
    dest = tmp_path / "volume"
    dest.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(dest)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = sync_into(dest, folder, clean_env)
    finally:
        subprocess.run(["umount", str(dest)], check=True)
    assert result.returncode == 2
    assert "mounted read-only" in error_line(result)


# -- signals and worker errors -------------------------------------------------------------------------------
def test_sigterm_mid_download_exits_143_with_one_line_and_a_termination_message_and_the_rerun_resumes(
        s3_server, s3_env, s3_proxy, bucket, tmp_path):
    """What the kubelet does to an init container of a deleted or evicted pod."""
    import signal

    files = {"weights.bin": os.urandom(6 * MiB), "config.json": b"{}"}
    upload_model(s3_server.client(), bucket, "term", files)
    s3_proxy.faults.throttle_bps = 1 * MiB
    dest, message = tmp_path / "v", tmp_path / "termination-log"
    args = ("sync", "--source", f"s3://{bucket}/term", "--dest", str(dest), "--termination-log", str(message))
    process = weightsync_popen(*args, env=s3_env)
    deadline = time.monotonic() + 30
    while s3_proxy.stats.bytes_down < 2 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    result = finish(process, timeout=60)
    assert result.returncode == 143, result.stderr
    assert "terminated by SIGTERM" in error_line(result)
    recorded = json.loads(message.read_text())
    assert recorded["result"] == "error" and recorded["exit_code"] == 143
    s3_proxy.faults.throttle_bps = None
    s3_proxy.stats.reset()
    rerun = finish(weightsync_popen(*args, env=s3_env))
    assert rerun.returncode == 0, rerun.stderr
    assert tree_bytes(Path(rerun.stdout.splitlines()[-1])) == files
    assert s3_proxy.stats.bytes_down < 5 * MiB, "the rerun resumed instead of starting over"


def test_an_integrity_failure_outranks_every_other_worker_error():
    from weightsync.errors import DiskSpaceError, IntegrityError, LockLostError, NetworkError, WeightsyncError
    from weightsync.fetch import _Aborted, severity

    ranked = [_Aborted(), WeightsyncError("other"), NetworkError("n"), LockLostError("l"), DiskSpaceError("d"),
              IntegrityError("i")]
    assert sorted(ranked, key=severity) == ranked
    assert max(reversed(ranked), key=severity) is ranked[-1]
