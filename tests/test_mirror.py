"""`weightsync mirror`: the fake Hub mirrored into SeaweedFS, then pods sync from the mirror.

What is proved here: the mirror is byte-identical and verified against the origin's promises, its objects carry
full-object checksums the server keeps, the lockfile object is the commit point (a corrupt origin byte leaves
nothing a sync accepts; a tampered mirror is refused), a SIGKILL resumes reading only what is missing from the
origin (the resumed object verified by reading it back from the target, so a part swapped in the store is caught),
a rerun uploads nothing, and a new revision uploads only what changed and deletes the rest after its lockfile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import signal
import time
from pathlib import Path

import pytest

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync, weightsync_popen
from tests.support.hubserver import HubServer

MiB = 1024 * 1024
BIG = "model-00001-of-00002.safetensors"
REPO = "acme/tiny"


def repo_files(seed: int = 0, big: int = 12 * MiB + 333) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        BIG: safetensors_bytes(rng.randbytes(big)),
        "model-00002-of-00002.safetensors": safetensors_bytes(rng.randbytes(MiB)),
        "pytorch_model.bin": rng.randbytes(4096),
        "tokenizer/tokenizer.json": b'{"vocab": ["a", "b"]}',
    }


@pytest.fixture
def env(hub: HubServer, s3_env: dict[str, str]) -> dict[str, str]:
    """The origin (the fake Hub) and the target (SeaweedFS, through the counting proxy) in one environment."""
    return {**s3_env, **hub.env(), "WEIGHTSYNC_PART_SIZE": "5", "WEIGHTSYNC_RETRY_BASE": "0.05"}


def served(hub: HubServer) -> int:
    """Bytes of file content the Hub sent (its API listings are not counted)."""
    hub.wait_idle()
    return sum(r.bytes_sent for r in hub.requests if "/resolve/" in r.path or r.is_cdn)


def mirror(env: dict[str, str], to: str, *extra: str, timeout: float = 120):
    return weightsync("mirror", "--source", f"hf://{REPO}", "--to", to, *extra, env=env, timeout=timeout)


def lockfile_object(client, bucket: str, prefix: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/weightsync.lock")["Body"].read())


def missing(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound")
    return False


def test_sync_from_the_mirror_with_the_hub_stopped_is_identical_verified_and_the_same_revision(
        hub, env, bucket, s3_env, tmp_path):
    files = repo_files()
    commit = hub.add_commit(REPO, files)
    target = f"s3://{bucket}/mirror/{REPO}"
    result = mirror(env, target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == target
    summary = result.stderr.strip().splitlines()[-1]
    assert f"mirrored hf://{REPO} revision {commit} to {target}: 5 files" in summary
    assert "uploaded 5 files" in summary and "skipped 0 files" in summary
    # the origin's own promises were checked while streaming: LFS sha256 and git blob ids
    assert "sha256 (source)" in summary and "git-sha1 (source)" in summary

    from_hub = weightsync("sync", "--source", f"hf://{REPO}", "--dest", str(tmp_path / "a"), env=env)
    assert from_hub.returncode == 0, from_hub.stderr
    hub.stop()
    from_mirror = weightsync("sync", "--source", target, "--dest", str(tmp_path / "b"), env=s3_env)
    assert from_mirror.returncode == 0, from_mirror.stderr
    published = Path(from_mirror.stdout.splitlines()[-1])
    assert published.name == commit == Path(from_hub.stdout.splitlines()[-1]).name
    assert tree_bytes(published) == files, "weightsync.lock is the mirror's, never a model file"
    assert "verified: 5 files sha256 (lockfile)" in from_mirror.stderr
    pinned = weightsync("sync", "--source", target, "--revision", commit, "--dest", str(tmp_path / "b"),
                        env=s3_env)
    assert pinned.returncode == 0 and "warm start" in pinned.stderr, pinned.stderr


def test_mirrored_objects_carry_full_object_checksums_and_sha256_metadata(hub, env, bucket, s3_server):
    from awscrt.checksums import crc64nvme

    files = repo_files(1)
    commit = hub.add_commit(REPO, files)
    assert mirror(env, f"s3://{bucket}/m").returncode == 0
    client = s3_server.client()
    for path, data in files.items():
        head = client.head_object(Bucket=bucket, Key=f"m/{path}", ChecksumMode="ENABLED")
        sha256 = hashlib.sha256(data).hexdigest()
        assert head["Metadata"]["sha256"] == sha256, path
        assert head["ContentLength"] == len(data)
        if len(data) > 5 * MiB:
            assert head["ETag"].strip('"').endswith("-3"), "the big file must really be multipart"
            assert head["ChecksumType"] == "FULL_OBJECT"
            assert head["ChecksumCRC64NVME"] == base64.b64encode(crc64nvme(data, 0).to_bytes(8, "big")).decode()
        else:
            assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode(), path
    locked = lockfile_object(client, bucket, "m")
    assert locked["source"] == f"hf://{REPO}" and locked["revision"] == commit
    by_path = {entry["path"]: entry for entry in locked["files"]}
    assert set(by_path) == set(files)
    assert by_path[BIG]["promise"]["field"] == "lfs"
    assert by_path[BIG]["promise"]["value"] == by_path[BIG]["sha256"] == hashlib.sha256(files[BIG]).hexdigest()
    git_blob = hashlib.sha1(b"blob %d\0" % len(files["config.json"]) + files["config.json"]).hexdigest()
    assert by_path["config.json"]["promise"] == {"algorithm": "git-sha1", "value": git_blob, "parts": 0,
                                                 "field": "git blob id", "origin": "source"}
    assert not client.list_objects_v2(Bucket=bucket, Prefix="m/.weightsync/").get("Contents"), "state cleared"


def test_a_corrupt_byte_from_the_origin_exits_4_and_commits_nothing_a_sync_accepts(
        hub, env, bucket, s3_server, s3_env, tmp_path):
    hub.add_commit(REPO, repo_files(2))
    hub.faults.corrupt = {BIG}
    hub.faults.corrupt_offset = 7 * MiB  # in the second part: the first is already uploaded when it arrives
    result = mirror(env, f"s3://{bucket}/bad")
    assert result.returncode == 4, result.stderr
    assert error_line(result).startswith(f"weightsync: error: checksum mismatch for {BIG}")
    client = s3_server.client()
    assert missing(client, bucket, "bad/weightsync.lock"), "no lockfile: nothing was committed"
    assert missing(client, bucket, f"bad/{BIG}"), "the corrupt file's upload was aborted, never completed"
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix="bad/").get("Uploads", [])
    assert not [u for u in uploads if u["Key"] == f"bad/{BIG}"]
    sync = weightsync("sync", "--source", f"s3://{bucket}/bad", "--dest", str(tmp_path), env=s3_env)
    assert sync.returncode == 3, sync.stderr
    assert "the mirror at" in error_line(sync) and "not complete yet" in error_line(sync)
    assert not list(tmp_path.glob("*/current"))


def test_an_object_tampered_in_the_mirror_is_refused_by_the_sync(hub, env, bucket, s3_server, s3_env, tmp_path):
    files = repo_files(3)
    hub.add_commit(REPO, files)
    assert mirror(env, f"s3://{bucket}/t").returncode == 0
    client = s3_server.client()
    tampered = bytearray(files[BIG])
    tampered[-100] ^= 1
    client.put_object(Bucket=bucket, Key=f"t/{BIG}", Body=bytes(tampered))  # same size, no x-amz-meta-sha256
    hub.stop()
    result = weightsync("sync", "--source", f"s3://{bucket}/t", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 4, result.stderr
    assert f"checksum mismatch for {BIG}" in error_line(result) and "weightsync.lock" in error_line(result)
    assert not list(tmp_path.glob("*/current")) and not list(tmp_path.glob("*/revisions/*"))

    client.put_object(Bucket=bucket, Key=f"t/{BIG}", Body=bytes(tampered), Metadata={
        "sha256": hashlib.sha256(tampered).hexdigest()})  # a rewrite that says what it holds: refused before reading
    result = weightsync("sync", "--source", f"s3://{bucket}/t", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 4, result.stderr
    assert error_line(result).startswith(f"weightsync: error: the mirror at s3://{bucket}/t is incomplete or "
                                         "changed")
    client.delete_object(Bucket=bucket, Key="t/config.json")
    result = weightsync("sync", "--source", f"s3://{bucket}/t", "--dest", str(tmp_path), env=s3_env)
    assert result.returncode == 4, result.stderr
    assert "incomplete or changed (config.json: missing)" in error_line(result)
    assert "rerun weightsync mirror" in error_line(result)


def kill_mid_upload(hub: HubServer, env: dict[str, str], to: str, size: int) -> int:
    """Start a mirror of the throttled BIG file, SIGKILL it once the Hub sent about half; the bytes served."""
    hub.faults.throttle_bps = 8 * MiB
    hub.faults.only_paths = {BIG}
    process = weightsync_popen("mirror", "--source", f"hf://{REPO}", "--to", to, env=env)
    deadline = time.monotonic() + 60
    while served(hub) < size // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = served(hub)
    assert size * 0.3 < first < size * 0.9, first
    hub.faults.throttle_bps = None
    hub.reset_log()
    return first


@pytest.mark.slow
def test_sigkill_mid_upload_resumes_reading_only_the_missing_bytes_from_the_origin_and_the_object_back_from_the_target(
        hub, env, bucket, s3_server, s3_proxy):
    size = 40 * MiB
    files = {**repo_files(4, big=size)}
    hub.add_commit(REPO, files)
    total = sum(len(data) for data in files.values())
    first = kill_mid_upload(hub, env, f"s3://{bucket}/k", size)
    client = s3_server.client()
    assert missing(client, bucket, "k/weightsync.lock")

    s3_proxy.stats.reset()
    resumed = weightsync("mirror", "--source", f"hf://{REPO}", "--to", f"s3://{bucket}/k", env=env)
    assert resumed.returncode == 0, resumed.stderr
    second = served(hub)
    print(f"resume: total {total} first run {first} second run {second} from the origin, "
          f"{s3_proxy.stats.bytes_down} from the target")
    assert f"{BIG}: resuming its upload after" in resumed.stderr
    assert f"{BIG}: the resumed upload read back from the target matches sha256 (source)" in resumed.stderr
    # Re-read from the origin: what was missing, plus at most the part in flight at the kill (5 MiB parts); the
    # whole resumed object is read back from the target (in the cluster) to verify it against the LFS sha256.
    assert second < (total - first) + 6 * MiB, (first, second, total)
    assert s3_proxy.stats.bytes_down >= size, "the resumed object was read back whole from the target"
    assert client.get_object(Bucket=bucket, Key=f"k/{BIG}")["Body"].read() == files[BIG]
    assert lockfile_object(client, bucket, "k")["files"]
    assert not client.list_objects_v2(Bucket=bucket, Prefix="k/.weightsync/").get("Contents"), "state cleared"


@pytest.mark.slow
def test_a_part_swapped_in_the_store_during_the_kill_fails_the_read_back_and_commits_nothing(
        hub, env, bucket, s3_server):
    from awscrt.checksums import crc64nvme

    size = 40 * MiB
    files = {**repo_files(12, big=size)}
    hub.add_commit(REPO, files)
    kill_mid_upload(hub, env, f"s3://{bucket}/sw", size)
    client = s3_server.client()
    (listed,) = client.list_objects_v2(Bucket=bucket, Prefix="sw/.weightsync/uploads/")["Contents"]
    state = json.loads(client.get_object(Bucket=bucket, Key=listed["Key"])["Body"].read())
    first = state["parts"][0]
    swapped = bytearray(files[BIG][:first["size"]])
    swapped[100] ^= 1  # someone with write access replaces part 1 and rewrites the state to match it
    reply = client.upload_part(Bucket=bucket, Key=f"sw/{BIG}", UploadId=state["upload_id"], PartNumber=1,
                               Body=bytes(swapped), ChecksumCRC64NVME=base64.b64encode(
                                   crc64nvme(bytes(swapped), 0).to_bytes(8, "big")).decode())
    first.update(etag=reply["ETag"].strip('"'), crc64nvme=reply["ChecksumCRC64NVME"])
    client.put_object(Bucket=bucket, Key=listed["Key"], Body=json.dumps(state).encode())

    resumed = mirror(env, f"s3://{bucket}/sw")
    assert resumed.returncode == 4, resumed.stderr
    assert f"{BIG}: resuming its upload after" in resumed.stderr
    assert error_line(resumed).startswith(f"weightsync: error: checksum mismatch for {BIG}"), resumed.stderr
    assert "read back from the target" in error_line(resumed)
    assert missing(client, bucket, "sw/weightsync.lock"), "nothing was committed"
    assert missing(client, bucket, f"sw/{BIG}"), "the unverified object was deleted"

    again = mirror(env, f"s3://{bucket}/sw")
    assert again.returncode == 0, again.stderr
    assert client.get_object(Bucket=bucket, Key=f"sw/{BIG}")["Body"].read() == files[BIG]


def test_a_mirror_killed_after_a_complete_verifies_that_object_by_reading_it_back_not_from_the_origin(
        hub, env, bucket, s3_server):
    files = repo_files(13)
    hub.add_commit(REPO, files)
    process = weightsync_popen("mirror", "--source", f"hf://{REPO}", "--to", f"s3://{bucket}/kc",
                               env={**env, "WEIGHTSYNC_TEST_PAUSE_AT": "mirror-upload-completed"})
    assert process.stderr is not None
    for line in process.stderr:  # BIG's upload completed, its resume state still there
        if "weightsync-test: paused at mirror-upload-completed" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    client = s3_server.client()
    assert missing(client, bucket, "kc/weightsync.lock") and not missing(client, bucket, f"kc/{BIG}")
    hub.reset_log()
    again = mirror(env, f"s3://{bucket}/kc")
    assert again.returncode == 0, again.stderr
    assert f"{BIG}: its upload was completed by a run killed before verifying it" in again.stderr
    assert f"{BIG}: the resumed upload read back from the target matches sha256 (source)" in again.stderr
    # the small files may not have been uploaded before the kill (about 1 MiB in all); BIG is 12 MiB
    assert served(hub) < 2 * MiB, "the completed object is verified from the target, not read again from the origin"
    assert client.get_object(Bucket=bucket, Key=f"kc/{BIG}")["Body"].read() == files[BIG]
    assert not client.list_objects_v2(Bucket=bucket, Prefix="kc/.weightsync/").get("Contents"), "state cleared"


def test_mirroring_the_same_revision_again_uploads_and_reads_nothing(hub, env, bucket, s3_proxy):
    hub.add_commit(REPO, repo_files(5))
    assert mirror(env, f"s3://{bucket}/twice").returncode == 0
    hub.reset_log()
    s3_proxy.stats.reset()
    again = mirror(env, f"s3://{bucket}/twice")
    assert again.returncode == 0, again.stderr
    summary = again.stderr.strip().splitlines()[-1]
    assert "uploaded 0 files (0 B)" in summary and "skipped 5 files" in summary, summary
    assert "read 0 B from the source" in summary
    assert "nothing uploaded, so nothing verified now" in summary and "verified against" not in summary, summary
    assert served(hub) == 0, "nothing is read from the origin for a revision already mirrored"
    assert s3_proxy.stats.bytes_up < 64 * 1024, "only HEADs and the small lockfile go to the target"


def test_a_new_revision_uploads_only_changed_files_and_deletes_removed_ones_after_its_lockfile(
        hub, env, bucket, s3_server, s3_proxy, s3_env, tmp_path):
    files = repo_files(6)
    hub.add_commit(REPO, files)
    assert mirror(env, f"s3://{bucket}/rev").returncode == 0
    new = hub.add_commit(REPO, {"config.json": b'{"model_type": "tiny", "v": 2}'}, delete=["pytorch_model.bin"])
    hub.reset_log()
    s3_proxy.stats.reset()
    result = mirror(env, f"s3://{bucket}/rev")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "uploaded 1 file" in summary and "skipped 3 files" in summary and "deleted 1 file" in summary, summary
    assert served(hub) < 1024, "unchanged files (same LFS sha256 / git blob id) are not read again"
    lines = result.stderr.splitlines()
    committed = next(i for i, line in enumerate(lines) if "committed" in line and "weightsync.lock" in line)
    deleted = next(i for i, line in enumerate(lines) if "deleted 1 file the new revision no longer has" in line)
    assert committed < deleted, "files are deleted only after the new lockfile is written"
    assert "pytorch_model.bin" in lines[deleted]
    client = s3_server.client()
    assert missing(client, bucket, "rev/pytorch_model.bin")
    assert lockfile_object(client, bucket, "rev")["revision"] == new
    hub.stop()
    synced = weightsync("sync", "--source", f"s3://{bucket}/rev", "--dest", str(tmp_path), env=s3_env)
    assert synced.returncode == 0, synced.stderr
    published = Path(synced.stdout.splitlines()[-1])
    assert published.name == new
    assert tree_bytes(published)["config.json"] == b'{"model_type": "tiny", "v": 2}'
    assert "pytorch_model.bin" not in tree_bytes(published)


def test_bad_target_credentials_or_a_missing_bucket_exit_3_in_one_line_without_the_secret(hub, env, bucket):
    hub.add_commit(REPO, repo_files(7))
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "definitely-wrong-secret-value"}
    denied = mirror(wrong, f"s3://{bucket}/x")
    assert denied.returncode == 3, denied.stderr
    assert "access denied" in error_line(denied)
    assert "definitely-wrong-secret-value" not in denied.stderr + denied.stdout
    absent = mirror(env, "s3://no-such-bucket-ws-mirror/x")
    assert absent.returncode == 3, absent.stderr
    assert "not found" in error_line(absent) and "--to" in error_line(absent)
    usage = weightsync("mirror", "--source", f"hf://{REPO}", "--to", "gs://elsewhere/x", env=env)
    assert usage.returncode == 2 and "s3://bucket/prefix" in error_line(usage)


def test_s3_to_s3_across_endpoints_verifies_the_origin_checksums_and_records_every_sha256(
        s3_server, bucket, s3_env, s3_proxy, tmp_path):
    from boto3.s3.transfer import TransferConfig

    client = s3_server.client()
    rng = random.Random(8)
    files = {"config.json": b'{"model_type": "tiny"}', "crc.bin": rng.randbytes(11 * MiB),
             "multipart.bin": rng.randbytes(13 * MiB), "empty.txt": b""}
    client.put_object(Bucket=bucket, Key="origin/config.json", Body=files["config.json"])
    client.put_object(Bucket=bucket, Key="origin/empty.txt", Body=b"")
    client.put_object(Bucket=bucket, Key="origin/crc.bin", Body=files["crc.bin"], ChecksumAlgorithm="CRC64NVME")
    upload = tmp_path / "multipart.bin"
    upload.write_bytes(files["multipart.bin"])
    client.upload_file(str(upload), bucket, "origin/multipart.bin",
                       Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB))
    store = f"store-{bucket}"
    client.create_bucket(Bucket=store)
    env = {**s3_env, "WEIGHTSYNC_PART_SIZE": "5"}
    s3_proxy.stats.reset()
    result = weightsync("mirror", "--source", f"s3://{bucket}/origin", "--to", f"s3://{store}/m",
                        "--to-endpoint", f"http://127.0.0.1:{s3_server.s3_port}", env=env)
    assert result.returncode == 0, result.stderr
    assert s3_proxy.stats.bytes_up < 256 * 1024, "the target's writes went to --to-endpoint, not the origin's"
    assert s3_proxy.stats.bytes_down > 24 * MiB, "the origin was read through its own endpoint"
    summary = result.stderr.strip().splitlines()[-1]
    assert "crc64nvme (source)" in summary, summary
    for path, data in files.items():
        head = client.head_object(Bucket=store, Key=f"m/{path}", ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest(), path
    origin = weightsync("sync", "--source", f"s3://{bucket}/origin", "--dest", str(tmp_path / "a"), env=s3_env)
    mirrored = weightsync("sync", "--source", f"s3://{store}/m", "--dest", str(tmp_path / "b"), env=s3_env)
    assert origin.returncode == 0 and mirrored.returncode == 0, origin.stderr + mirrored.stderr
    assert Path(mirrored.stdout.splitlines()[-1]).name == Path(origin.stdout.splitlines()[-1]).name
    assert tree_bytes(Path(mirrored.stdout.splitlines()[-1])) == files


@pytest.mark.parametrize(("args", "needle"), [
    (["--to", "s3://b/p", "--part-size", "4"], "--part-size"),
    (["--to", "s3://b/p", "--part-size", "lots"], "--part-size"),
    (["--to", "s3://b/p", "--to-endpoint", "ftp://store:21"], "--to-endpoint"),
    (["--to", "s3://"], "no bucket"),
    ([], "--to is required"),
    (["--to", "s3://b/p", "--dest", "/models"], "unrecognized option --dest"),
])
def test_bad_mirror_arguments_exit_2_with_one_line(args, needle, clean_env):
    result = weightsync("mirror", "--source", "hf://acme/tiny", *args, env=clean_env)
    assert result.returncode == 2, result.stderr
    assert needle in error_line(result)


def test_mirror_options_are_also_environment_variables(clean_env):
    result = weightsync("mirror", env={**clean_env, "WEIGHTSYNC_SOURCE": "s3://same/p", "WEIGHTSYNC_TO": "s3://same/p",
                                       "WEIGHTSYNC_PART_SIZE": "64"})
    assert result.returncode == 2 and "is the source itself" in error_line(result), result.stderr
    bad = weightsync("mirror", env={**clean_env, "WEIGHTSYNC_SOURCE": "hf://a/b", "WEIGHTSYNC_TO": "s3://b/p",
                                    "WEIGHTSYNC_PART_SIZE": "1"})
    assert bad.returncode == 2 and "WEIGHTSYNC_PART_SIZE" in error_line(bad), bad.stderr


def test_a_hub_cache_layout_sync_from_the_mirror_lands_under_the_hub_commit(hub, env, bucket, s3_env, tmp_path):
    files = repo_files(9)
    commit = hub.add_commit(REPO, files)
    assert mirror(env, f"s3://{bucket}/hc").returncode == 0
    hub.stop()
    result = weightsync("sync", "--source", f"s3://{bucket}/hc", "--dest", str(tmp_path), "--layout", "hf-cache",
                        "--repo-id", REPO, env=s3_env)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.splitlines()[-1])
    assert snapshot == tmp_path / "models--acme--tiny" / "snapshots" / commit, "servers load it as the Hub's commit"
    assert tree_bytes(snapshot) == files


class _VoidingSource:
    """An origin whose every reply proves its listed MD5 unsound (as an SSE-KMS object's ETag), and whose
    describe(thorough) gives a sha256: the mirror must re-verify by that, never fall back to the size alone."""

    kind, uri, default_name, default_ref = "fake", "fake://voiding", "voiding", None

    def __init__(self, data: bytes) -> None:
        from weightsync.sources import Features

        self.data = data
        self.features = Features(describes=True, promises=frozenset({"md5", "sha256"}), voids_promises=True)

    def pinned_revision(self, revision):
        return None

    def snapshot(self, revision, selection):
        from weightsync.checksums import Promise
        from weightsync.sources import RemoteFile, Snapshot

        md5 = hashlib.md5(self.data).hexdigest()
        return Snapshot("0" * 20, (RemoteFile("a.bin", len(self.data), (Promise("md5", md5, "ETag"),), etag=md5),))

    def describe(self, file, thorough=False):
        from weightsync.checksums import Promise

        sha256 = Promise("sha256", hashlib.sha256(self.data).hexdigest(), "x-amz-meta-sha256")
        return file.with_promises((*file.promises, sha256)) if thorough else file

    def open_range(self, file, start, end):
        data = self.data[start:end]

        class Reader:
            voids = {"ETag": "the ETag of an aws:kms (SSE-KMS) object is not an MD5"}
            sent = 0

            def readinto(self, buffer):
                count = min(len(buffer), len(data) - self.sent)
                buffer[:count] = data[self.sent:self.sent + count]
                self.sent += count
                return count

            def close(self):
                pass

        return Reader()


def test_a_reply_that_voids_the_promise_being_checked_reverifies_by_the_next_one(bucket, s3_env, s3_server,
                                                                                   monkeypatch):
    from weightsync.mirror import Mirror, MirrorRequest

    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    data = random.Random(10).randbytes(3 * MiB)
    result = Mirror(MirrorRequest(source="fake://voiding", to=f"s3://{bucket}/v", addressing_style="path"),
                    source=_VoidingSource(data)).run()
    (evidence,) = result.evidence
    assert evidence.promise is not None and evidence.promise.field == "x-amz-meta-sha256", evidence
    assert s3_server.client().get_object(Bucket=bucket, Key="v/a.bin")["Body"].read() == data


def test_a_mirror_killed_between_its_commit_and_its_deletions_deletes_on_the_rerun(hub, env, bucket, s3_server):
    hub.add_commit(REPO, repo_files(11))
    assert mirror(env, f"s3://{bucket}/kd").returncode == 0
    new = hub.add_commit(REPO, delete=["pytorch_model.bin"])
    process = weightsync_popen("mirror", "--source", f"hf://{REPO}", "--to", f"s3://{bucket}/kd",
                               env={**env, "WEIGHTSYNC_TEST_PAUSE_AT": "mirror-committed"})
    assert process.stderr is not None
    for line in process.stderr:  # the pause point, right after the new lockfile is written
        if "weightsync-test: paused at mirror-committed" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    client = s3_server.client()
    assert lockfile_object(client, bucket, "kd")["revision"] == new
    assert not missing(client, bucket, "kd/pytorch_model.bin"), "killed before its deletions"
    again = mirror(env, f"s3://{bucket}/kd")
    assert again.returncode == 0, again.stderr
    summary = again.stderr.strip().splitlines()[-1]
    assert "uploaded 0 files" in summary and "deleted 1 file" in summary, summary
    assert missing(client, bucket, "kd/pytorch_model.bin")
    assert not client.list_objects_v2(Bucket=bucket, Prefix="kd/.weightsync/").get("Contents")


def test_pods_on_the_mirror_with_the_hub_as_fallback_survive_either_one_down(hub, env, bucket, s3_proxy, tmp_path):
    """The fleet pattern end to end: `weightsync mirror` fills the store from the fake Hub; then a pod's
    `sync --source s3://mirror --fallback hf://` gets the model from the mirror while the Hub is stopped, from the
    Hub while the mirror is down (one `source_fallback` line saying why), the same revision (the Hub's commit)
    both times, and on a restart pinned to that commit makes no request to either."""
    import socket

    files = repo_files(3)
    commit = hub.add_commit(REPO, files)
    target = f"s3://{bucket}/mirror/{REPO}"
    assert mirror(env, target).returncode == 0
    with socket.socket() as closed:  # bound, never listening: every connection to it is refused at once
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"

        def sync(dest: Path, run_env: dict[str, str], *extra: str):
            return weightsync("sync", "--source", target, "--fallback", f"hf://{REPO}", "--dest", str(dest),
                              "--retries", "2", *extra, env=run_env)

        hub.wait_idle()
        hub.reset_log()
        from_mirror = sync(tmp_path / "a", {**env, "HF_ENDPOINT": nowhere})
        assert from_mirror.returncode == 0, from_mirror.stderr
        assert tree_bytes(Path(from_mirror.stdout.splitlines()[-1])) == files
        assert Path(from_mirror.stdout.splitlines()[-1]).name == commit, "the mirror reports the Hub's commit"
        assert "source_fallback" not in from_mirror.stderr and served(hub) == 0

        from_hub = sync(tmp_path / "b", {**env, "AWS_ENDPOINT_URL": nowhere})
        assert from_hub.returncode == 0, from_hub.stderr
        assert tree_bytes(Path(from_hub.stdout.splitlines()[-1])) == files
        assert Path(from_hub.stdout.splitlines()[-1]).name == commit
        assert "failed while resolving (NetworkError (exit 7)" in from_hub.stderr, from_hub.stderr
        assert f"trying the next source, hf://{REPO}" in from_hub.stderr
        assert f"published hf://{REPO} revision {commit} (fallback for {target})" in from_hub.stderr

        s3_proxy.stats.reset()
        hub.wait_idle()
        hub.reset_log()
        pinned = sync(tmp_path / "a", {**env, "HF_ENDPOINT": nowhere, "AWS_ENDPOINT_URL": nowhere},
                      "--revision", commit)
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.splitlines()[-1] == from_mirror.stdout.splitlines()[-1]
    assert s3_proxy.stats.connections == 0 and not hub.requests, "a pinned restart asks neither source"
