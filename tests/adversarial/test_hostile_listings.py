"""Hostile and odd listings: nothing is ever written outside DEST; unsafe names are refused with a clear error;
odd-but-valid names (unicode, spaces, empty objects, case twins, > 1000 keys) arrive byte-identical."""

from __future__ import annotations

import unicodedata

import pytest

from tests.adversarial.harness import last_path, snapshot_outside, ws
from tests.support.helpers import error_line, tree_bytes

REFUSED = {
    "dotdot": ("../escape.bin", "'..' component"),
    "dotdot-deep": ("a/../../escape.bin", "'..' component"),
    "leading-slash": ("/etc/escape.bin", "is absolute"),
    "backslash": ("..\\..\\escape.bin", "backslash"),
    "nul": ("a\x00b.bin", "NUL"),
    "control": ("a\x1b[2Jb.bin", "control character"),  # a terminal escape sequence in a name
    "long-component": ("x" * 300 + ".bin", "longer than 255 bytes"),
    "dot": ("./x.bin", "'.' or '..'"),
    "empty-component": ("sub//x.bin", "empty"),
}


@pytest.fixture(scope="module")
def permissive_s3():
    """moto's S3 server stores any key byte for byte (SeaweedFS normalises keys like file paths), so it stands in
    for a compromised or odd S3-compatible endpoint that lists hostile names."""
    from tests.support.s3server import MotoS3

    with MotoS3() as server:
        client = server.client()
        client.create_bucket(Bucket="hostile-listings")
        yield client, server.endpoint


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_s3_unsafe_names_are_refused_and_nothing_lands_outside_dest(permissive_s3, s3_env, area, case):
    root, dest = area
    name, reason = REFUSED[case]
    client, endpoint = permissive_s3
    env = {**s3_env, "AWS_ENDPOINT_URL": endpoint}
    key = f"{case}/{name}"
    client.put_object(Bucket="hostile-listings", Key=key, Body=b"evil")
    listed = client.list_objects_v2(Bucket="hostile-listings", Prefix=f"{case}/")["Contents"]
    assert any(o["Key"] == key for o in listed)
    client.put_object(Bucket="hostile-listings", Key=f"{case}/config.json", Body=b"{}")
    before = snapshot_outside(root, dest)
    result = ws("sync", "--source", f"s3://hostile-listings/{case}", "--dest", str(dest), env=env)
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert "refusing file" in line and reason in line and "--exclude" in line, line
    assert snapshot_outside(root, dest) == before
    assert not list(dest.rglob("*.bin")), "no file of a refused listing is written"
    # The documented way out: exclude the bad name, and the rest syncs.
    excluded = ws("sync", "--source", f"s3://hostile-listings/{case}", "--dest", str(dest), "--exclude", "*.bin",
                  "--exclude", "xxx*", env=env)
    assert excluded.returncode == 0, excluded.stderr
    assert tree_bytes(last_path(excluded)) == {"config.json": b"{}"}
    assert snapshot_outside(root, dest) == before


def test_s3_file_that_is_also_a_directory_is_refused(s3_server, bucket, s3_env, area):
    _root, dest = area
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="fd/a", Body=b"file")
    client.put_object(Bucket=bucket, Key="fd/a/b", Body=b"child")
    result = ws("sync", "--source", f"s3://{bucket}/fd", "--dest", str(dest), env=s3_env)
    assert result.returncode == 4, result.stderr
    assert "both a file and the directory" in error_line(result)


def test_s3_odd_but_valid_names_sync_byte_identical(s3_server, bucket, s3_env, area):
    root, dest = area
    nfc, nfd = unicodedata.normalize("NFC", "café.txt"), unicodedata.normalize("NFD", "café.txt")
    files = {
        "modèle/重み.safetensors": b"unicode" * 100,
        "my model/weights 1.bin": b"spaces",
        "empty.bin": b"",
        "Model.bin": b"upper",
        "model.bin": b"lower",
        nfc: b"composed",
        nfd: b"decomposed",
        "deep/" * 20 + "leaf.txt": b"deep",
        "x" * 255: b"longest component",
        "-leading-dash": b"dash",
        "%2e%2e/pct.bin": b"percent-encoded dots are just characters",
    }
    client = s3_server.client()
    for name, body in files.items():
        client.put_object(Bucket=bucket, Key=f"odd/{name}", Body=body)
    client.put_object(Bucket=bucket, Key="odd/dirmarker/", Body=b"")  # an S3 "folder": skipped
    before = snapshot_outside(root, dest)
    result = ws("sync", "--source", f"s3://{bucket}/odd", "--dest", str(dest), env=s3_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(last_path(result)) == files
    assert snapshot_outside(root, dest) == before
    verify = ws("verify", "--source", f"s3://{bucket}/odd", "--dest", str(dest), env=s3_env)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.slow
def test_s3_listing_of_more_than_1000_keys_is_paginated(s3_server, bucket, s3_env, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    client = s3_server.client()
    files = {f"shard-{i:04d}.txt": b"%d" % i for i in range(1105)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=f"many/{item[0]}", Body=item[1]),
                      files.items()))
    result = ws("sync", "--source", f"s3://{bucket}/many", "--dest", str(tmp_path), "--concurrency", "16",
                env=s3_env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(last_path(result)) == files


@pytest.mark.parametrize("name,reason", [("../evil.txt", "'..' component"), ("a/../../evil.txt", "'..' component"),
                                         ("a\\b.txt", "backslash")])
def test_hub_listing_with_unsafe_names_is_refused(hub, hub_env, area, name, reason):
    """The Hub would never list these; a compromised mirror (HF_ENDPOINT) could."""
    root, dest = area
    commit = hub.add_commit("acme/evil", {"config.json": b"{}"})
    repo = hub._repo("acme/evil", "model")
    tree = repo.commits[commit]
    tree.files[name] = tree.files["config.json"]
    parts = name.split("/")
    for depth in range(1, len(parts)):
        tree.dir_oids.setdefault("/".join(parts[:depth]), "0" * 40)
    before = snapshot_outside(root, dest)
    result = ws("sync", "--source", "hf://acme/evil", "--dest", str(dest), env=hub_env)
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert "refusing file" in line and reason in line
    assert snapshot_outside(root, dest) == before
