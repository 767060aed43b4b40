"""S3 source against a real S3 server (SeaweedFS): cold sync, multipart, warm start, resume, reuse."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, upload_model, weightsync, weightsync_popen

MiB = 1024 * 1024


def model_files(seed: int = 0, big: int = 3 * MiB) -> dict[str, bytes]:
    rng = __import__("random").Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "model-00001-of-00002.safetensors": safetensors_bytes(rng.randbytes(big)),
        "model-00002-of-00002.safetensors": safetensors_bytes(rng.randbytes(big // 2)),
        "tokenizer/vocab.txt": b"hello\nworld\n",
        "empty.txt": b"",
    }


def test_cold_sync_is_byte_identical_and_prints_path_last(s3_server, bucket, s3_env, tmp_path):
    files = model_files()
    upload_model(s3_server.client(), bucket, "models/tiny", files)
    result = weightsync("sync", "--source", f"s3://{bucket}/models/tiny", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 0, result.stderr
    published = Path(result.stdout.strip().splitlines()[-1])
    assert published.is_absolute() and published.is_dir()
    assert tree_bytes(published) == files
    current = tmp_path / f"s3--{bucket}--models--tiny" / "current"
    assert current.resolve() == published.resolve()


def test_multipart_object_is_verified_not_reported_as_corrupt(s3_server, bucket, s3_env, tmp_path):
    from boto3.s3.transfer import TransferConfig

    data = os.urandom(20 * MiB + 123)
    client = s3_server.client()
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    client.upload_file(str(source), bucket, "mp/weights.bin",
                       Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    etag = client.head_object(Bucket=bucket, Key="mp/weights.bin")["ETag"]
    assert "-" in etag, "the object must really be multipart for this test"
    result = weightsync("sync", "--source", f"s3://{bucket}/mp", "--dest", str(tmp_path / "vol"), env=s3_env)
    assert result.returncode == 0, result.stderr
    published = Path(result.stdout.splitlines()[-1])
    assert (published / "weights.bin").read_bytes() == data


def test_checksum_sha256_of_the_object_is_checked(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    data = os.urandom(4 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="ck/w.bin", Body=data, ChecksumAlgorithm="SHA256")
    s3_proxy.faults.flip_byte_at = 3 * MiB
    result = weightsync("sync", "--source", f"s3://{bucket}/ck", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 4, result.stderr
    assert error_line(result).startswith("weightsync: error: checksum mismatch for w.bin")
    name_dir = tmp_path / f"s3--{bucket}--ck"
    assert not (name_dir / "revisions").exists() or not any((name_dir / "revisions").iterdir())
    assert not (name_dir / "current").exists()
    # The bad file was discarded; a clean rerun succeeds and is byte-identical.
    again = weightsync("sync", "--source", f"s3://{bucket}/ck", "--dest", str(tmp_path), env=s3_env)
    assert again.returncode == 0, again.stderr
    assert (Path(again.stdout.splitlines()[-1]) / "w.bin").read_bytes() == data


def test_pinned_warm_start_makes_zero_requests(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    upload_model(s3_server.client(), bucket, "warm", model_files(1))
    first = weightsync("sync", "--source", f"s3://{bucket}/warm", "--dest", str(tmp_path), env=s3_env)
    assert first.returncode == 0, first.stderr
    revision = Path(first.stdout.splitlines()[-1]).name
    s3_proxy.stats.reset()
    second = weightsync("sync", "--source", f"s3://{bucket}/warm", "--revision", revision, "--dest",
                        str(tmp_path), env=s3_env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    assert s3_proxy.stats.connections == 0 and s3_proxy.stats.bytes_down == 0


def test_unpinned_warm_start_only_lists(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    files = model_files(2)
    upload_model(s3_server.client(), bucket, "list", files)
    assert weightsync("sync", "--source", f"s3://{bucket}/list", "--dest", str(tmp_path), env=s3_env).returncode == 0
    s3_proxy.stats.reset()
    again = weightsync("sync", "--source", f"s3://{bucket}/list", "--dest", str(tmp_path), env=s3_env)
    assert again.returncode == 0, again.stderr
    assert "warm start" in again.stderr
    assert s3_proxy.stats.bytes_down < 20_000, "a warm start must not download model bytes"


def test_changed_prefix_gets_new_revision_and_reuses_unchanged_files(s3_server, bucket, s3_env, s3_proxy,
                                                                     tmp_path):
    client = s3_server.client()
    files = model_files(3, big=8 * MiB)
    upload_model(client, bucket, "m", files)
    first = weightsync("sync", "--source", f"s3://{bucket}/m", "--dest", str(tmp_path), env=s3_env)
    assert first.returncode == 0, first.stderr
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"model_type": "tiny", "v": 2}')
    s3_proxy.stats.reset()
    second = weightsync("sync", "--source", f"s3://{bucket}/m", "--dest", str(tmp_path), env=s3_env)
    assert second.returncode == 0, second.stderr
    old, new = Path(first.stdout.splitlines()[-1]), Path(second.stdout.splitlines()[-1])
    assert old != new and old.is_dir() and new.is_dir()
    assert (new / "config.json").read_bytes() == b'{"model_type": "tiny", "v": 2}'
    assert (new / "model-00001-of-00002.safetensors").stat().st_ino == \
        (old / "model-00001-of-00002.safetensors").stat().st_ino
    assert s3_proxy.stats.bytes_down < 1 * MiB, "unchanged shards must be reused, not downloaded again"


def test_include_and_exclude_select_files_into_their_own_revision(s3_server, bucket, s3_env, tmp_path):
    upload_model(s3_server.client(), bucket, "f", {**model_files(4), "pytorch_model.bin": b"x" * 100})
    only = weightsync("sync", "--source", f"s3://{bucket}/f", "--dest", str(tmp_path), "--include",
                      "*.safetensors", "--include", "*.json", "--exclude", "model-00002-*", env=s3_env)
    assert only.returncode == 0, only.stderr
    assert sorted(tree_bytes(Path(only.stdout.splitlines()[-1]))) == ["config.json",
                                                                       "model-00001-of-00002.safetensors"]
    everything = weightsync("sync", "--source", f"s3://{bucket}/f", "--dest", str(tmp_path), env=s3_env)
    assert everything.returncode == 0
    assert "pytorch_model.bin" in tree_bytes(Path(everything.stdout.splitlines()[-1]))


def test_single_object_uri_syncs_that_object(s3_server, bucket, s3_env, tmp_path):
    s3_server.client().put_object(Bucket=bucket, Key="gguf/model.gguf", Body=b"GGUF" * 1000)
    result = weightsync("sync", "--source", f"s3://{bucket}/gguf/model.gguf", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == {"model.gguf": b"GGUF" * 1000}


def test_directory_markers_are_skipped(s3_server, bucket, s3_env, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="dm/sub/", Body=b"")
    client.put_object(Bucket=bucket, Key="dm/sub/a.bin", Body=b"abc")
    result = weightsync("sync", "--source", f"s3://{bucket}/dm", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == {"sub/a.bin": b"abc"}


def test_missing_bucket_exits_3(s3_env, tmp_path):
    result = weightsync("sync", "--source", "s3://no-such-bucket-ws/x", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 3, result.stderr
    assert "not found" in error_line(result)


def test_empty_prefix_exits_3(bucket, s3_env, tmp_path):
    result = weightsync("sync", "--source", f"s3://{bucket}/nothing-here", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 3 and "no objects under" in result.stderr


def test_wrong_credentials_exit_3_without_leaking_them(bucket, s3_env, tmp_path):
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret-value"}
    result = weightsync("sync", "--source", f"s3://{bucket}/x", "--dest", str(tmp_path), env=env)
    assert result.returncode == 3, result.stderr
    assert "definitely-wrong-secret-value" not in result.stderr + result.stdout


def test_nothing_listening_exits_7_after_retries(s3_env, tmp_path):
    from tests.support.s3server import free_port

    env = {**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "WEIGHTSYNC_RETRY_BASE": "0.01"}
    started = time.monotonic()
    result = weightsync("sync", "--source", "s3://bucket/x", "--dest", str(tmp_path), env=env, timeout=120)
    assert result.returncode == 7, result.stderr
    assert "gave up after" in error_line(result)
    assert time.monotonic() - started < 110


@pytest.mark.slow
def test_sigkill_mid_sync_resumes_fetching_only_missing_bytes(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    files = {f"shard-{i}.bin": hashlib.sha256(b"%d" % i).digest() * (48 * MiB // 32) for i in range(3)}
    files["config.json"] = b"{}"
    upload_model(s3_server.client(), bucket, "kill", files)
    total = sum(len(v) for v in files.values())
    s3_proxy.faults.throttle_bps = 16 * MiB
    process = weightsync_popen("sync", "--source", f"s3://{bucket}/kill", "--dest", str(tmp_path), env=s3_env)
    deadline = time.monotonic() + 60
    while s3_proxy.stats.bytes_down < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_run = s3_proxy.stats.bytes_down
    assert total * 0.3 < first_run < total * 0.9
    name_dir = tmp_path / f"s3--{bucket}--kill"
    assert not (name_dir / "current").exists(), "a killed sync must not publish anything"
    assert not (name_dir / "revisions").exists() or not list((name_dir / "revisions").iterdir())

    s3_proxy.faults.throttle_bps = None
    s3_proxy.stats.reset()
    resumed = weightsync("sync", "--source", f"s3://{bucket}/kill", "--dest", str(tmp_path), env=s3_env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(Path(resumed.stdout.splitlines()[-1])) == files
    second_run = s3_proxy.stats.bytes_down
    missing = total - first_run
    # Bytes re-fetched ≈ bytes missing: allow what was in flight between the last state save and the kill.
    print(f"resume: total {total} first run {first_run} second run {second_run} missing {missing}")
    assert second_run < missing + 0.15 * total, (first_run, second_run, total)
    assert "resumed" in resumed.stderr
