"""The verifier on its own: each checksum kind against independent reference values, the choice of promise.

Reference values come from zlib, awscrt and hashlib directly, and from values AWS documents,
never from weightsync's own code.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib

import pytest
from awscrt import checksums as crt

from weightsync.checksums import Evidence, Promise, Verifier, choose, from_base64
from weightsync.errors import IntegrityError

KiB = 1024


def feed(verifier: Verifier, data: bytes, step: int) -> str:
    for start in range(0, len(data), step):
        verifier.update(memoryview(data)[start:start + step])
    return verifier.finish()


def parts_of(data: bytes, sizes: list[int]) -> list[bytes]:
    out, start = [], 0
    for size in sizes:
        out.append(data[start:start + size])
        start += size
    return out


REFERENCE = {
    "crc32": lambda b: zlib.crc32(b).to_bytes(4, "big"),
    "crc32c": lambda b: crt.crc32c(b).to_bytes(4, "big"),
    "crc64nvme": lambda b: crt.crc64nvme(b).to_bytes(8, "big"),
    "sha1": lambda b: hashlib.sha1(b).digest(),
    "sha256": lambda b: hashlib.sha256(b).digest(),
    "md5": lambda b: hashlib.md5(b).digest(),
}


def test_crc_implementations_match_the_published_check_values():
    # The "123456789" check values of the CRC catalogue (CRC-32/ISO-HDLC, CRC-32/ISCSI, CRC-64/NVME).
    promises = {"crc32": "cbf43926", "crc32c": "e3069283", "crc64nvme": "ae8b14860a799888"}
    for algorithm, value in promises.items():
        verifier = Verifier("check", 9, Evidence(Promise(algorithm, value, "test")))
        assert feed(verifier, b"123456789", 4) == hashlib.sha256(b"123456789").hexdigest()


@pytest.mark.parametrize("algorithm", sorted(REFERENCE))
@pytest.mark.parametrize("sizes", [[5 * KiB, 7 * KiB, 6 * KiB, 2 * KiB], [8 * KiB, 8 * KiB, 1], [3 * KiB]])
@pytest.mark.parametrize("step", [1000, 4096, 1 << 20])
def test_composite_over_uneven_parts_matches_an_independent_computation(algorithm, sizes, step):
    data = os.urandom(sum(sizes))
    reference = REFERENCE[algorithm]
    value = reference(b"".join(reference(part) for part in parts_of(data, sizes))).hex()
    promise = Promise(algorithm, value, "test", parts=len(sizes), layout=tuple(sizes))
    assert feed(Verifier("w.bin", len(data), Evidence(promise)), data, step) == hashlib.sha256(data).hexdigest()
    wrong_layout = Promise(algorithm, value, "test", parts=len(sizes) + 1, layout=(1, *sizes[:-1], sizes[-1] - 1))
    with pytest.raises(IntegrityError, match=r"checksum mismatch for w\.bin"):
        feed(Verifier("w.bin", len(data), Evidence(wrong_layout)), data, step)


def test_a_multipart_etag_is_the_md5_of_the_part_md5s_printed_with_its_part_count():
    data = os.urandom(20 * KiB)
    sizes = [8 * KiB, 8 * KiB, 4 * KiB]
    etag = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts_of(data, sizes))).hexdigest()
    promise = Promise("md5", etag, "ETag", parts=3, layout=tuple(sizes))
    assert promise.label == "multipart etag, 3 parts (source)" and promise.shown == f"{etag}-3"
    feed(Verifier("w.bin", len(data), Evidence(promise)), data, 3000)
    damaged = bytearray(data)
    damaged[9 * KiB] ^= 1
    with pytest.raises(IntegrityError) as caught:
        feed(Verifier("w.bin", len(data), Evidence(promise)), bytes(damaged), 3000)
    assert f"multipart etag, 3 parts {etag}-3 (ETag)" in str(caught.value)


def test_a_listed_part_checksum_names_the_damaged_part():
    data = os.urandom(12 * KiB)
    sizes = [5 * KiB, 5 * KiB, 2 * KiB]
    crcs = [REFERENCE["crc32"](p) for p in parts_of(data, sizes)]
    promise = Promise("crc32", REFERENCE["crc32"](b"".join(crcs)).hex(), "ChecksumCRC32", parts=3,
                      layout=tuple(sizes), part_values=tuple(c.hex() for c in crcs))
    damaged = bytearray(data)
    damaged[6 * KiB] ^= 0x80
    with pytest.raises(IntegrityError, match=r"part 2 of 3 \(bytes 5120-10239\) does not match its part checksum"):
        feed(Verifier("w.bin", len(data), Evidence(promise)), bytes(damaged), 4096)


def test_an_s3_checksum_header_parses_as_aws_documents_it():
    # boto3's documented example: the CRC32 of b"hello world" is "DUoRhQ==".
    promise = from_base64("crc32", "DUoRhQ==", "ChecksumCRC32")
    assert promise is not None and promise.value == zlib.crc32(b"hello world").to_bytes(4, "big").hex()
    assert promise.shown == "DUoRhQ==" and not promise.parts
    composite = from_base64("crc32", "HXQgTw==-3", "ChecksumCRC32")
    assert composite is not None and composite.parts == 3 and not composite.usable, "no layout yet"
    assert composite.with_layout((1, 2, 3)).usable
    assert from_base64("crc32", "not base64!", "ChecksumCRC32") is None


def test_the_cheapest_sound_promise_is_chosen():
    sha = Promise("sha256", "ab" * 32, "ChecksumSHA256")
    crc64 = Promise("crc64nvme", "00" * 8, "ChecksumCRC64NVME")
    crc32 = Promise("crc32", "00" * 4, "ChecksumCRC32")
    md5 = Promise("md5", "00" * 16, "ETag")
    composite = Promise("sha256", "cd" * 32, "ChecksumSHA256", parts=3, layout=(1, 1, 1))
    assert choose([md5, crc32, sha]) is sha, "a whole-file sha256 costs nothing: it is computed anyway"
    assert choose([md5, crc32, crc64]) is crc64
    assert choose([md5, composite]) is composite, "a second sha256 pass is cheaper than MD5"
    assert choose([md5.void("SSE-KMS"), crc32]) is crc32
    assert choose([md5.void("SSE-KMS")]) is None
    assert Evidence.of([md5.void("the ETag of an aws:kms (SSE-KMS) object is not an MD5")]).label == \
        "size only: the ETag of an aws:kms (SSE-KMS) object is not an MD5"
    assert Evidence.of([]).label == "size only: the source promised nothing"
    lockfile = Promise("sha256", "ab" * 32, "", origin="lockfile")
    assert choose([sha, lockfile]) is lockfile


def test_verifier_computes_only_what_the_promise_needs():
    data = os.urandom(1000)
    sha = Promise("sha256", hashlib.sha256(data).hexdigest(), "lfs")
    crc = Promise("crc64nvme", REFERENCE["crc64nvme"](data).hex(), "ChecksumCRC64NVME")
    assert Verifier("a", 1000, Evidence(sha)).computed == ("sha256",)
    assert Verifier("a", 1000, Evidence(crc)).computed == ("sha256", "crc64nvme")
    assert Verifier("a", 1000, Evidence(None, "the source promised nothing")).computed == ("sha256",)


def test_size_is_checked_even_when_nothing_was_promised():
    verifier = Verifier("a", 10, Evidence(None, "the source promised nothing"))
    verifier.update(b"123")
    with pytest.raises(IntegrityError, match="size mismatch for a: expected 10 bytes, got 3"):
        verifier.finish()


def test_evidence_round_trips_through_json():
    promise = Promise("crc32c", "0a0b0c0d", "ChecksumCRC32C", parts=4, layout=(1, 2, 3, 4))
    evidence = Evidence(promise)
    again = Evidence.from_json(evidence.to_json())
    assert again is not None and again.label == "crc32c composite, 4 parts (source)"
    assert again.promise is not None and again.promise.same_claim(promise)
    assert base64.b64decode(promise.shown.split("-")[0]).hex() == "0a0b0c0d"
    size_only = Evidence(None, "the source promised nothing")
    assert Evidence.from_json(size_only.to_json()) == size_only
