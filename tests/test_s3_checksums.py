"""Every byte of a multipart shard is checked against the checksum S3 really holds (SeaweedFS, faithful to AWS).

Uploads are made the way users make them: boto3's and aws-cli's defaults, an explicit
ChecksumAlgorithm, FULL_OBJECT CRCs, no checksum at all, and uneven manual parts. For each,
the value the server holds is first recomputed here independently (zlib, awscrt, hashlib), so
a server quirk cannot pass for a product bug or the other way round. Then:

- a clean sync publishes, names the evidence, and `verify` passes;
- a proxy that flips a byte in the big shard's GET bodies (only there: a small single-part
  file that failed first would hide the shard's check) makes the sync exit 4 with one line
  naming the shard and the check, and nothing is published.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import error_line, reference_digests, weightsync

MiB = 1024 * 1024
SHARD = "model.safetensors"


# Independent reference implementations: not weightsync's code. Keyed as S3 names them (ChecksumCRC32, ...).
DIGESTS: dict[str, Callable[[bytes], bytes]] = {name.upper(): digest for name, digest in reference_digests().items()
                                                if name != "git-sha1"}


def composite(algorithm: str, data: bytes, sizes: list[int]) -> bytes:
    """The checksum of the concatenated part checksums, over the given part boundaries."""
    digest, start, joined = DIGESTS[algorithm], 0, b""
    for size in sizes:
        joined += digest(data[start:start + size])
        start += size
    return digest(joined)


@dataclass(frozen=True)
class Shape:
    """One way users upload a shard, and what the server must then hold."""

    name: str
    sizes: tuple[int, ...]             # part sizes in MiB
    algorithm: str | None              # ChecksumAlgorithm asked for (None: none)
    full_object: bool = False          # ChecksumType FULL_OBJECT instead of COMPOSITE
    via: str = "manual"                # manual parts, boto3 upload_file, or the aws cli
    evidence: str = ""

    @property
    def size(self) -> int:
        return sum(self.sizes) * MiB


SHAPES = [
    Shape("boto3-defaults", (8, 8, 4), "CRC32", via="boto3", evidence="crc32 composite, 3 parts (source)"),
    Shape("aws-cli-defaults", (8, 8, 4), "CRC32", via="aws-cli", evidence="crc32 composite, 3 parts (source)"),
    Shape("crc64nvme", (8, 8, 4), "CRC64NVME", full_object=True, via="boto3", evidence="crc64nvme (source)"),
    Shape("crc32c", (8, 8, 4), "CRC32C", via="boto3", evidence="crc32c composite, 3 parts (source)"),
    Shape("sha256", (8, 8, 4), "SHA256", via="boto3", evidence="sha256 composite, 3 parts (source)"),
    Shape("sha1", (8, 8, 4), "SHA1", via="boto3", evidence="sha1 composite, 3 parts (source)"),
    Shape("no-checksum", (8, 8, 4), None, evidence="multipart etag, 3 parts (source)"),
    Shape("uneven-no-checksum", (5, 7, 6, 2), None, evidence="multipart etag, 4 parts (source)"),
    Shape("uneven-crc32", (5, 7, 6, 2), "CRC32", evidence="crc32 composite, 4 parts (source)"),
    Shape("crc32-full-object", (8, 8, 4), "CRC32", full_object=True, evidence="crc32 (source)"),
    Shape("crc32c-full-object", (5, 7, 6, 2), "CRC32C", full_object=True, evidence="crc32c (source)"),
]


def plain_client(s3_server: Any) -> Any:
    """A client that adds no checksum of its own (`when_required`), like older SDKs and many tools."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))


def upload(s3_server: Any, bucket: str, key: str, data: bytes, shape: Shape, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    part = shape.sizes[0] * MiB
    if shape.via == "boto3":
        extra = {"ChecksumAlgorithm": shape.algorithm} if shape.algorithm != "CRC32" else {}
        s3_server.client().upload_fileobj(__import__("io").BytesIO(data), bucket, key, ExtraArgs=extra,
                                          Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part))
        return
    if shape.via == "aws-cli":
        path = tmp_path / "upload.bin"
        path.write_bytes(data)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
               "AWS_DEFAULT_REGION": "us-east-1"}
        aws = Path(sys.executable).with_name("aws")
        subprocess.run([str(aws), "s3", "cp", str(path), f"s3://{bucket}/{key}", "--endpoint-url", s3_server.endpoint,
                        "--only-show-errors"], env=env, check=True, timeout=120)
        return
    client = plain_client(s3_server)
    start: dict[str, Any] = {}
    if shape.algorithm:
        start["ChecksumAlgorithm"] = shape.algorithm
        start["ChecksumType"] = "FULL_OBJECT" if shape.full_object else "COMPOSITE"
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **start)["UploadId"]
    parts, offset = [], 0
    for number, size in enumerate(shape.sizes, 1):
        body = data[offset:offset + size * MiB]
        offset += size * MiB
        extra = {}
        if shape.algorithm:
            extra[f"Checksum{shape.algorithm}"] = base64.b64encode(DIGESTS[shape.algorithm](body)).decode()
        reply = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body, **extra)
        parts.append({"PartNumber": number, "ETag": reply["ETag"], **extra})
    complete: dict[str, Any] = {}
    if shape.algorithm and shape.full_object:
        complete = {f"Checksum{shape.algorithm}": base64.b64encode(DIGESTS[shape.algorithm](data)).decode(),
                    "ChecksumType": "FULL_OBJECT"}
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts},
                                     **complete)


def expected_on_server(shape: Shape, data: bytes) -> dict[str, str]:
    """What HeadObject must say for this upload, computed here without weightsync."""
    sizes = [s * MiB for s in shape.sizes]
    md5s = b"".join(hashlib.md5(data[sum(sizes[:i]):sum(sizes[:i + 1])]).digest() for i in range(len(sizes)))
    expected = {"ETag": f'"{hashlib.md5(md5s).hexdigest()}-{len(sizes)}"'}
    if shape.algorithm and shape.full_object:
        expected[f"Checksum{shape.algorithm}"] = base64.b64encode(DIGESTS[shape.algorithm](data)).decode()
        expected["ChecksumType"] = "FULL_OBJECT"
    elif shape.algorithm:
        value = base64.b64encode(composite(shape.algorithm, data, sizes)).decode()
        expected[f"Checksum{shape.algorithm}"] = f"{value}-{len(sizes)}"
        expected["ChecksumType"] = "COMPOSITE"
    return expected


@pytest.fixture(params=SHAPES, ids=lambda shape: shape.name)
def uploaded(request, s3_server, bucket, tmp_path) -> tuple[Shape, str, bytes]:
    """A model of one big multipart shard plus a small config, uploaded in one of the users' ways."""
    shape: Shape = request.param
    data = random.Random(shape.name).randbytes(shape.size)
    prefix = f"m/{shape.name}"
    upload(s3_server, bucket, f"{prefix}/{SHARD}", data, shape, tmp_path)
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b'{"model_type": "tiny"}')
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/{SHARD}", ChecksumMode="ENABLED")
    held = {name: head.get(name) for name in expected_on_server(shape, data)}
    assert held == expected_on_server(shape, data), "the server must hold what AWS would (SeaweedFS >= 4.48)"
    return shape, f"s3://{bucket}/{prefix}", data


def test_clean_sync_names_the_evidence_and_verify_passes(uploaded, s3_env, tmp_path):
    shape, uri, data = uploaded
    dest = tmp_path / "vol"
    result = weightsync("sync", "--source", uri, "--dest", str(dest), "--log-format", "json", env=s3_env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [shard] = [e for e in events if e["event"] == "file_verified" and e["path"] == SHARD]
    assert shard["evidence"] == shape.evidence
    assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert "md5" not in shard["computed"] or shape.algorithm is None, "MD5 only where nothing cheaper is promised"
    [published] = [e for e in events if e["event"] == "published"]
    grouped = re.sub(r", \d+ parts", "", shape.evidence)  # tallies leave out part counts: they stay short
    assert published["evidence"] == {grouped: 1, "md5 (source)": 1}
    assert "sha256-verified" not in result.stderr
    directory = Path(result.stdout.splitlines()[-1])
    assert (directory / SHARD).read_bytes() == data
    manifest = json.loads(next(dest.glob("*/manifests/*.json")).read_text())
    [entry] = [f for f in manifest["files"] if f["path"] == SHARD]
    assert entry["verified"]["evidence"] == shape.evidence
    status = json.loads(weightsync("status", "--dest", str(dest), "--json", env=s3_env, check=True).stdout)
    assert status["models"][0]["revisions"][0]["evidence"] == {grouped: 1, "md5 (source)": 1}
    verify = weightsync("verify", "--source", uri, "--dest", str(dest), env=s3_env)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize("where", ["first-byte", "second-part"])
def test_a_corrupted_shard_exits_4_names_the_check_and_publishes_nothing(uploaded, where, s3_env, s3_proxy,
                                                                           tmp_path):
    shape, uri, _data = uploaded
    s3_proxy.faults.corrupt_key = SHARD
    s3_proxy.faults.corrupt_offsets = (0,) if where == "first-byte" else (shape.sizes[0] * MiB + 12345,)
    dest = tmp_path / "vol"
    result = weightsync("sync", "--source", uri, "--dest", str(dest), env=s3_env)
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert line.startswith(f"weightsync: error: checksum mismatch for {SHARD}: the source promised "), line
    assert shape.evidence.removesuffix(" (source)") in line, line
    name_dir = next(dest.iterdir())
    assert not (name_dir / "current").exists()
    assert not (name_dir / "revisions").exists() or not any((name_dir / "revisions").iterdir())
    assert not list(name_dir.glob(f".staging/*/tree/{SHARD}")), "the bad shard must not wait in staging either"
    s3_proxy.faults.corrupt_key = None
    again = weightsync("sync", "--source", uri, "--dest", str(dest), env=s3_env)
    assert again.returncode == 0, again.stderr


def test_a_corrupted_shard_error_carries_the_path_and_both_checksums_as_fields(s3_server, bucket, s3_env, s3_proxy,
                                                                                tmp_path):
    composite_model(s3_server, bucket, "fields")
    s3_proxy.faults.corrupt_key = SHARD
    s3_proxy.faults.corrupt_offsets = (9 * MiB + 7,)  # in the second 8 MiB part
    termination = tmp_path / "termination"
    result = weightsync("--log-format", "json", "sync", "--source", f"s3://{bucket}/fields", "--dest",
                        str(tmp_path / "vol"), "--termination-log", str(termination), env=s3_env)
    assert result.returncode == 4, result.stderr
    [error] = [e for e in json_events(result) if e["event"] == "error"]
    message = json.loads(termination.read_text())
    for report in (error, message):
        assert report["path"] == SHARD and report["exit_code"] == 4, report
        text = report["error"] if "error" in report else report["message"]
        assert report["expected"] != report["got"] and report["expected"] in text, report
        assert report["expected"].endswith("-3"), report  # boto3's default: CRC32 COMPOSITE over 3 parts


def composite_model(s3_server: Any, bucket: str, prefix: str, size_mib: int = 20, seed: int = 1) -> dict[str, bytes]:
    """A boto3-default multipart shard (CRC32 COMPOSITE, 8 MiB parts) and a small single-part config."""
    data = random.Random(seed).randbytes(size_mib * MiB)
    upload(s3_server, bucket, f"{prefix}/{SHARD}", data, SHAPES[0], Path("/nonexistent"))
    config = b'{"model_type": "tiny", "seed": %d}' % seed
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=config)
    return {SHARD: data, "config.json": config}


def json_events(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def test_resumed_bytes_are_checked_against_the_composite_checksum(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    import signal
    import time

    from tests.support.helpers import weightsync_popen

    files = composite_model(s3_server, bucket, "resume", size_mib=40)
    uri, dest = f"s3://{bucket}/resume", tmp_path / "vol"
    s3_proxy.faults.throttle_bps = 8 * MiB
    process = weightsync_popen("sync", "--source", uri, "--dest", str(dest), "--concurrency", "1", env=s3_env)
    deadline = time.monotonic() + 60
    while s3_proxy.stats.bytes_down < 20 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    [part] = dest.glob("*/.staging/*/parts/*.part")
    with open(part, "r+b") as handle:  # bit rot in bytes a previous run already wrote: resume must not trust them
        handle.seek(MiB)
        byte = handle.read(1)
        handle.seek(MiB)
        handle.write(bytes([byte[0] ^ 1]))
    s3_proxy.faults.throttle_bps = None
    resumed = weightsync("sync", "--source", uri, "--dest", str(dest), env=s3_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from an earlier run failed verification" in resumed.stderr
    assert "crc32 composite, 5 parts" in resumed.stderr.split("re-downloading")[0]
    assert (Path(resumed.stdout.splitlines()[-1]) / SHARD).read_bytes() == files[SHARD]


def test_a_reused_shard_keeps_the_evidence_it_was_verified_by(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    composite_model(s3_server, bucket, "reuse")
    uri, dest = f"s3://{bucket}/reuse", tmp_path / "vol"
    assert weightsync("sync", "--source", uri, "--dest", str(dest), env=s3_env).returncode == 0
    s3_server.client().put_object(Bucket=bucket, Key="reuse/config.json", Body=b'{"model_type": "tiny", "v": 2}')
    s3_proxy.stats.reset()
    second = weightsync("sync", "--source", uri, "--dest", str(dest), "--log-format", "json", env=s3_env)
    assert second.returncode == 0, second.stderr
    assert s3_proxy.stats.bytes_down < MiB, "the shard is hardlinked, not downloaded"
    [shard] = [e for e in json_events(second) if e["event"] == "file_verified" and e["path"] == SHARD]
    assert (shard["how"], shard["evidence"]) == ("reused", "crc32 composite, 3 parts (source)")
    [plan] = [e for e in json_events(second) if e["event"] == "plan"]
    assert plan["metadata_requests"] == 0, "the small config's MD5 ETag needs no HEAD; the shard was not described"


def test_the_plan_counts_the_metadata_requests(s3_server, bucket, s3_env, tmp_path):
    composite_model(s3_server, bucket, "plan")
    result = weightsync("sync", "--source", f"s3://{bucket}/plan", "--dest", str(tmp_path), "--log-format", "json",
                        env=s3_env)
    assert result.returncode == 0, result.stderr
    [plan] = [e for e in json_events(result) if e["event"] == "plan"]
    assert plan["metadata_requests"] == 2, "HeadObject, then one GetObjectAttributes page for the part layout"


def test_without_get_object_attributes_each_part_size_is_asked_with_a_head(s3_server, bucket, s3_env, monkeypatch):
    from weightsync.sources import Selection
    from weightsync.sources.s3 import S3Source
    from weightsync.sources.s3api import S3Error

    data = composite_model(s3_server, bucket, "noattrs")[SHARD]
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    source = S3Source.from_uri(f"s3://{bucket}/noattrs", addressing_style="path")

    def refuse(*_: Any) -> None:  # an IAM policy that grants s3:GetObject but not s3:GetObjectAttributes
        raise S3Error(403, "AccessDenied", "denied", {})

    monkeypatch.setattr(source.api, "object_parts", refuse)
    [shard] = [f for f in source.snapshot(None, Selection()).files if f.path == SHARD]
    described = source.describe(shard)
    assert described.metadata_requests == 1 + 1 + 3
    assert described.evidence.label == "crc32 composite, 3 parts (source)"
    assert described.evidence.promise.layout == (8 * MiB, 8 * MiB, 4 * MiB)
    assert len(data) == 20 * MiB


def test_lockfile_records_the_source_promise_and_refuses_a_rewritten_object_before_downloading(
        s3_server, bucket, s3_env, s3_proxy, tmp_path):
    composite_model(s3_server, bucket, "locked")
    uri = f"s3://{bucket}/locked"
    lock = weightsync("lock", "--source", uri, env=s3_env)
    assert lock.returncode == 0, lock.stderr
    body = json.loads(lock.stdout)
    [entry] = [f for f in body["files"] if f["path"] == SHARD]
    assert entry["promise"]["field"] == "ChecksumCRC32" and entry["promise"]["parts"] == 3
    lockfile = tmp_path / "weightsync.lock"
    lockfile.write_text(lock.stdout)
    synced = weightsync("sync", "--lockfile", str(lockfile), "--dest", str(tmp_path / "a"), "--log-format", "json",
                        env=s3_env)
    assert synced.returncode == 0, synced.stderr
    [published] = [e for e in json_events(synced) if e["event"] == "published"]
    assert published["evidence"] == {"sha256 (lockfile)": 2}
    composite_model(s3_server, bucket, "locked", seed=2)  # same sizes, other bytes
    s3_proxy.stats.reset()
    changed = weightsync("sync", "--lockfile", str(lockfile), "--dest", str(tmp_path / "b"), env=s3_env)
    assert changed.returncode == 4
    assert "no longer matches --lockfile" in error_line(changed)
    assert s3_proxy.stats.bytes_down < MiB, "a rewritten object is refused before its bytes are fetched"


def test_require_checksum_refuses_what_promises_nothing_before_downloading(s3_server, bucket, s3_env, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(MiB))
    dest = tmp_path / "vol"
    refused = weightsync("sync", "--source", str(folder), "--dest", str(dest), "--require-checksum", env=s3_env)
    assert refused.returncode == 4
    line = error_line(refused)
    assert "--require-checksum: weights.bin has no checksum to verify it by (the source promised nothing)" in line
    assert not list(dest.glob("*/.staging/*/parts/*.part")), "nothing may be downloaded"
    lock = weightsync("lock", "--source", str(folder), env=s3_env, check=True)
    (tmp_path / "folder.lock").write_text(lock.stdout)
    pinned = weightsync("sync", "--lockfile", str(tmp_path / "folder.lock"), "--dest", str(dest),
                        "--require-checksum", env=s3_env)
    assert pinned.returncode == 0, pinned.stderr
    composite_model(s3_server, bucket, "req")
    env = {**s3_env, "WEIGHTSYNC_REQUIRE_CHECKSUM": "1"}
    s3 = weightsync("sync", "--source", f"s3://{bucket}/req", "--dest", str(dest), "--log-format", "json", env=env)
    assert s3.returncode == 0, s3.stderr
    [plan] = [e for e in json_events(s3) if e["event"] == "plan"]
    assert plan["metadata_requests"] == 3, "every file is described: the config's CRC32 beats its MD5 ETag"
    [published] = [e for e in json_events(s3) if e["event"] == "published"]
    assert published["evidence"] == {"crc32 (source)": 1, "crc32 composite (source)": 1}


def test_metrics_count_published_files_by_evidence(s3_server, bucket, s3_env, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    composite_model(s3_server, bucket, "metrics")
    textfile = tmp_path / "ws.prom"
    result = weightsync("sync", "--source", f"s3://{bucket}/metrics", "--dest", str(tmp_path / "v"),
                        "--metrics-textfile", str(textfile), env=s3_env)
    assert result.returncode == 0, result.stderr
    families = text_string_to_metric_families(textfile.read_text())
    samples = {sample.labels["evidence"]: sample.value for family in families
               if family.name == "weightsync_published_files" for sample in family.samples}
    assert samples == {"crc32-composite": 1.0, "md5": 1.0}


def test_an_sse_kms_object_is_reported_as_size_only_and_refused_under_require_checksum(s3_env, tmp_path):
    """SeaweedFS has no SSE-KMS, so moto stands in: only its SSE header matters here, not its checksums."""
    from tests.support.s3server import MotoS3

    with MotoS3() as server:
        client = server.client(request_checksum_calculation="when_required")  # the ETag is the only promise
        client.create_bucket(Bucket="kms")
        client.put_object(Bucket="kms", Key="m/config.json", Body=b"{}", ServerSideEncryption="aws:kms")
        env = {**s3_env, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "moto",
               "AWS_SECRET_ACCESS_KEY": "moto"}
        result = weightsync("sync", "--source", "s3://kms/m", "--dest", str(tmp_path / "a"), env=env)
        assert result.returncode == 0, result.stderr
        reason = "the ETag of an aws:kms (SSE-KMS) object is not an MD5"
        assert f"config.json: {reason}; only its size is checked" in result.stderr
        assert result.stderr.strip().splitlines()[-1].endswith(f"verified: 1 file size only: {reason}")
        refused = weightsync("sync", "--source", "s3://kms/m", "--dest", str(tmp_path / "b"), "--require-checksum",
                             env=env)
        assert refused.returncode == 4
        assert reason in error_line(refused)


def test_require_checksum_refuses_a_size_only_revision_already_published_and_keeps_it(tmp_path, clean_env):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 1000)
    dest = tmp_path / "vol"
    first = weightsync("sync", "--source", str(folder), "--dest", str(dest), env=clean_env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.strip().endswith("verified: 1 file size only: the source promised nothing")
    published = Path(first.stdout.splitlines()[-1])
    warm = weightsync("sync", "--source", str(folder), "--dest", str(dest), "--require-checksum", env=clean_env)
    assert warm.returncode == 4
    assert "weights.bin checked by size only when it was published" in error_line(warm)
    assert (published / "weights.bin").read_bytes() == b"w" * 1000, "a revision pods may be serving is kept"
