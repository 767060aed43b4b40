"""S3 source unit tests against moto's server on loopback: listing, checksums it promises, revisions, errors.

moto runs as a real HTTP server (ThreadedMotoServer): weightsync's S3 client is plain HTTP, so moto's in-process
botocore patching would not see it, and a server is what users run anyway.
"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from tests.support.s3server import MotoS3
from weightsync.errors import SourceError, UsageError
from weightsync.sources import Selection
from weightsync.sources.s3 import S3Source


@pytest.fixture(scope="module")
def moto_server():
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3(moto_server, monkeypatch):
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "moto")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    client = moto_server.client()
    client.create_bucket(Bucket="bkt")
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bkt"):
        for item in page.get("Contents", []):
            client.delete_object(Bucket="bkt", Key=item["Key"])
    client.delete_bucket(Bucket="bkt")


def source(uri: str = "s3://bkt/models/tiny") -> S3Source:
    return S3Source.from_uri(uri)


def test_listing_is_relative_to_the_prefix_and_skips_directory_markers(s3):
    s3.put_object(Bucket="bkt", Key="models/tiny/config.json", Body=b"{}")
    s3.put_object(Bucket="bkt", Key="models/tiny/sub/", Body=b"")
    s3.put_object(Bucket="bkt", Key="models/tiny/sub/w.bin", Body=b"abc")
    s3.put_object(Bucket="bkt", Key="models/tiny2/other.bin", Body=b"not me")
    snapshot = source().snapshot(None, Selection())
    assert sorted(f.path for f in snapshot.files) == ["config.json", "sub/w.bin"]


def test_single_part_etag_is_promised_as_md5(s3):
    s3.put_object(Bucket="bkt", Key="models/tiny/w.bin", Body=b"abc")
    [file] = source().snapshot(None, Selection()).files
    [promise] = file.promises
    assert (promise.algorithm, promise.value, promise.parts) == ("md5", hashlib.md5(b"abc").hexdigest(), 0)
    assert file.sha256 is None and file.evidence.label == "md5 (source)"


def test_multipart_etag_is_not_an_md5_and_describe_finds_the_sha256_metadata(s3):
    data = os.urandom(6 * 1024 * 1024)
    upload = s3.create_multipart_upload(Bucket="bkt", Key="models/tiny/big.bin",
                                        Metadata={"sha256": hashlib.sha256(data).hexdigest()})
    parts = []
    for number, start in enumerate(range(0, len(data), 5 * 1024 * 1024), 1):
        part = s3.upload_part(Bucket="bkt", Key="models/tiny/big.bin", UploadId=upload["UploadId"],
                              PartNumber=number, Body=data[start:start + 5 * 1024 * 1024])
        parts.append({"ETag": part["ETag"], "PartNumber": number})
    s3.complete_multipart_upload(Bucket="bkt", Key="models/tiny/big.bin", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": parts})
    src = source()
    [file] = src.snapshot(None, Selection()).files
    assert "-" in file.etag and file.evidence.promise is None, "a multipart ETag is no MD5 of the object"
    described = src.describe(file)
    assert described.sha256 == hashlib.sha256(data).hexdigest()
    assert described.evidence.promise.field == "x-amz-meta-sha256"


def test_checksum_sha256_of_the_object_is_promised(s3):
    data = b"weights" * 1000
    s3.put_object(Bucket="bkt", Key="models/tiny/w.bin", Body=data, ChecksumAlgorithm="SHA256",
                  ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode())
    s3.put_object(Bucket="bkt", Key="models/tiny/rclone.bin", Body=b"x",
                  Metadata={"md5chksum": base64.b64encode(hashlib.md5(b"x").digest()).decode()})
    src = source()
    files = {f.path: f for f in src.snapshot(None, Selection()).files}
    assert src.describe(files["w.bin"]) == files["w.bin"], "a small object's MD5 ETag needs no HEAD"
    described = src.describe(files["w.bin"], thorough=True)
    assert described.sha256 == hashlib.sha256(data).hexdigest() and described.metadata_requests == 1
    assert described.evidence.label == "sha256 (source)", "a free sha256 beats the MD5 ETag"
    rclone = src.describe(files["rclone.bin"], thorough=True)
    assert [(p.algorithm, p.value) for p in rclone.promises if p.field == "x-amz-meta-md5chksum"] == [
        ("md5", hashlib.md5(b"x").hexdigest())]


def test_listing_of_more_than_1000_keys_is_paginated(s3):
    for i in range(1005):
        s3.put_object(Bucket="bkt", Key=f"models/tiny/f{i:04d}", Body=b"x")
    assert len(source().snapshot(None, Selection()).files) == 1005


def test_revision_is_stable_for_an_unchanged_prefix_and_changes_with_content(s3):
    s3.put_object(Bucket="bkt", Key="models/tiny/a", Body=b"1")
    first = source().snapshot(None, Selection()).revision
    assert source().snapshot(None, Selection()).revision == first
    assert source().pinned_revision(first) == first
    s3.put_object(Bucket="bkt", Key="models/tiny/a", Body=b"2")
    assert source().snapshot(None, Selection()).revision != first
    filtered = source().snapshot(None, Selection(exclude=("b*",))).revision
    assert len(filtered) == 20


def test_single_object_uri(s3):
    s3.put_object(Bucket="bkt", Key="models/model.gguf", Body=b"GGUF")
    src = source("s3://bkt/models/model.gguf")
    [file] = src.snapshot(None, Selection()).files
    assert file.path == "model.gguf" and file.locator == "models/model.gguf"
    fresh = source("s3://bkt/models/model.gguf")  # the locator alone finds the bytes: no state from snapshot()
    reader = fresh.open_range(file, 1, 4)
    buffer = memoryview(bytearray(8))
    assert buffer[: reader.readinto(buffer)].tobytes() == b"GUF"
    reader.close()


def test_missing_bucket_and_empty_prefix_are_source_errors(s3):
    with pytest.raises(SourceError, match="not found"):
        source("s3://no-such-bucket/x").snapshot(None, Selection())
    with pytest.raises(SourceError, match="no objects under"):
        source("s3://bkt/empty").snapshot(None, Selection())


def test_bad_uri_and_bad_revision_are_usage_errors():
    with pytest.raises(UsageError):
        S3Source.from_uri("s3:///prefix")
    with pytest.raises(UsageError, match="not an S3 revision"):
        source().pinned_revision("main")


def test_ranged_read_is_pinned_to_the_listed_etag(s3):
    s3.put_object(Bucket="bkt", Key="models/tiny/w.bin", Body=b"0123456789")
    src = source()
    [file] = src.snapshot(None, Selection()).files
    reader = src.open_range(file, 2, 6)
    buffer = memoryview(bytearray(16))
    count = reader.readinto(buffer)
    reader.close()
    assert bytes(buffer[:count]) == b"2345"


def test_an_sse_kms_etag_is_not_taken_for_an_md5(s3, moto_server):
    # moto stands in for AWS KMS here (SeaweedFS has no SSE-KMS); the promise logic is the same either way.
    plain = moto_server.client(request_checksum_calculation="when_required")
    plain.put_object(Bucket="bkt", Key="models/tiny/w.bin", Body=b"abc", ServerSideEncryption="aws:kms")
    src = source()
    [file] = src.snapshot(None, Selection()).files
    assert file.evidence.label == "md5 (source)", "the listing alone cannot tell"
    described = src.describe(file, thorough=True)
    assert described.evidence.label == "size only: the ETag of an aws:kms (SSE-KMS) object is not an MD5"
    reader = src.open_range(file, 0, 3)
    assert reader.voids == {"ETag": "the ETag of an aws:kms (SSE-KMS) object is not an MD5"}
    reader.close()
