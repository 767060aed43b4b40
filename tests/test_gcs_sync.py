"""gs:// sources against gcp-storage-emulator (tests/support/gcsserver.py): verified, resumable, pinned, and
authenticated the way GKE's Workload Identity and key files do it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import BlackHole
from tests.support.gcsserver import FakeMetadataServer, GcsEmulator, RecordingGateway, RefusingTokenEndpoint
from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync, weightsync_popen
from tests.support.proxy import CountingProxy

MiB = 1024 * 1024


def model_files(seed: int = 0, big: int = 3 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "model-00001-of-00002.safetensors": safetensors_bytes(rng.randbytes(big)),
        "model-00002-of-00002.safetensors": safetensors_bytes(rng.randbytes(big // 2)),
        "tokenizer/vocab.txt": b"hello\nworld\n",
        "empty.txt": b"",
    }


def upload(server: GcsEmulator, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        server.upload(bucket, f"{prefix}/{name}", data)


def json_events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def published(result: subprocess.CompletedProcess[str]) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def nothing_published(dest: Path, name: str) -> bool:
    folder = dest / name
    return not (folder / "current").exists() and not list(folder.glob("revisions/*"))


def test_cold_sync_is_byte_identical_paginated_and_reports_crc32c_evidence(gcs_server, gcs_bucket, gcs_env,
                                                                           gcs_proxy, tmp_path):
    files = model_files()
    upload(gcs_server, gcs_bucket, "models/tiny", files)
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/models/tiny", "--dest", str(tmp_path),
                        "--log-format", "json", env=gcs_env)
    assert result.returncode == 0, result.stderr
    folder = published(result)
    assert tree_bytes(folder) == files
    assert (tmp_path / f"gs--{gcs_bucket}--models--tiny" / "current").resolve() == folder.resolve()
    events = json_events(result.stderr)
    evidence = {e["path"]: e["evidence"] for e in events if e["event"] == "file_verified"}
    # crc32c is the cheapest check GCS vouches for (0.02 CPU s/GiB against md5's 1.24): every file is checked by it.
    assert set(evidence) == set(files) and set(evidence.values()) == {"crc32c (source)"}, evidence
    [report] = [e for e in events if e["event"] == "published"]
    assert report["evidence"] == {"crc32c (source)": len(files)}


def test_pagination_lists_every_object_across_pages(gcs_server, gcs_bucket, gcs_env, tmp_path):
    files = {f"shards/part-{i:03d}.bin": b"%d" % i for i in range(11)}  # four pages of three
    upload(gcs_server, gcs_bucket, "paged", files)
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/paged", "--dest", str(tmp_path), env=gcs_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published(result)) == files


def test_composite_object_has_no_md5_and_is_verified_by_crc32c(gcs_server, gcs_bucket, gcs_env, tmp_path):
    first, second = os.urandom(1 * MiB + 17), os.urandom(2 * MiB)
    gcs_server.upload(gcs_bucket, "parts/a", first)
    gcs_server.upload(gcs_bucket, "parts/b", second)
    composite = gcs_server.compose(gcs_bucket, "comp/weights.bin", ["parts/a", "parts/b"])
    assert "md5Hash" not in composite and composite["crc32c"], "as on GCS: a composite object has a crc32c only"
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/comp", "--dest", str(tmp_path), "--log-format",
                        "json", "--require-checksum", env=gcs_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published(result)) == {"weights.bin": first + second}
    [verified] = [e for e in json_events(result.stderr) if e["event"] == "file_verified"]
    assert verified["evidence"] == "crc32c (source)"


def test_single_object_uri_syncs_that_object_and_directory_markers_are_skipped(gcs_server, gcs_bucket, gcs_env,
                                                                              tmp_path):
    gcs_server.upload(gcs_bucket, "gguf/model.gguf", b"GGUF" * 1000)
    one = weightsync("sync", "--source", f"gs://{gcs_bucket}/gguf/model.gguf", "--dest", str(tmp_path), env=gcs_env)
    assert one.returncode == 0, one.stderr
    assert tree_bytes(published(one)) == {"model.gguf": b"GGUF" * 1000}
    gcs_server.upload(gcs_bucket, "dm/sub/", b"")  # what the console's "Create folder" leaves
    gcs_server.upload(gcs_bucket, "dm/sub/a.bin", b"abc")
    marked = weightsync("sync", "--source", f"gs://{gcs_bucket}/dm", "--dest", str(tmp_path), env=gcs_env)
    assert marked.returncode == 0, marked.stderr
    assert tree_bytes(published(marked)) == {"sub/a.bin": b"abc"}


def test_pinned_warm_start_makes_zero_requests(gcs_server, gcs_bucket, gcs_env, gcs_proxy, tmp_path):
    upload(gcs_server, gcs_bucket, "warm", model_files(1))
    first = weightsync("sync", "--source", f"gs://{gcs_bucket}/warm", "--dest", str(tmp_path), env=gcs_env)
    assert first.returncode == 0, first.stderr
    gcs_proxy.stats.reset()
    again = weightsync("sync", "--source", f"gs://{gcs_bucket}/warm", "--revision", published(first).name,
                       "--dest", str(tmp_path), env=gcs_env)
    assert again.returncode == 0, again.stderr
    assert published(again) == published(first)
    assert gcs_proxy.stats.connections == 0 and gcs_proxy.stats.bytes_down == 0


def test_missing_bucket_and_empty_prefix_exit_3_and_say_which(gcs_server, gcs_bucket, gcs_env, tmp_path):
    bucket = weightsync("sync", "--source", "gs://no-such-bucket-ws/x", "--dest", str(tmp_path), env=gcs_env)
    assert bucket.returncode == 3, bucket.stderr
    assert "bucket gs://no-such-bucket-ws not found" in error_line(bucket)
    empty = weightsync("sync", "--source", f"gs://{gcs_bucket}/nothing-here", "--dest", str(tmp_path), env=gcs_env)
    assert empty.returncode == 3, empty.stderr
    assert f"no objects under gs://{gcs_bucket}/nothing-here" in error_line(empty)


def test_bytes_corrupted_in_transit_exit_4_and_nothing_is_published(gcs_server, gcs_bucket, gcs_env, gcs_proxy,
                                                                    tmp_path):
    files = model_files(2, big=9 * MiB)  # the big shard is a resumable upload, read in several ranges
    upload(gcs_server, gcs_bucket, "rot", files)
    gcs_proxy.faults.corrupt_key = "model-00001-of-00002.safetensors?alt=media"
    gcs_proxy.faults.corrupt_offsets = (5 * MiB + 3,)
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/rot", "--dest", str(tmp_path), env=gcs_env)
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert "checksum mismatch for model-00001-of-00002.safetensors" in line and "crc32c" in line, line
    assert nothing_published(tmp_path, f"gs--{gcs_bucket}--rot")
    gcs_proxy.faults.corrupt_key = None
    again = weightsync("sync", "--source", f"gs://{gcs_bucket}/rot", "--dest", str(tmp_path), env=gcs_env)
    assert again.returncode == 0, again.stderr
    assert tree_bytes(published(again)) == files


def test_a_stalled_endpoint_exits_7_after_the_stall_timeout_and_retries(gcs_env, tmp_path):
    hole = BlackHole()
    try:
        started = time.monotonic()
        result = weightsync("sync", "--source", "gs://bucket/x", "--dest", str(tmp_path), "--stall-timeout", "1",
                            "--retries", "2", "--retry-base", "0.05",
                            env={**gcs_env, "STORAGE_EMULATOR_HOST": hole.url})
    finally:
        hole.close()
    assert result.returncode == 7, result.stderr
    assert "gave up after" in error_line(result)
    assert time.monotonic() - started < 60


def test_a_body_that_stops_mid_file_is_resumed_on_a_fresh_connection(gcs_server, gcs_bucket, gcs_env, gcs_proxy,
                                                                     tmp_path):
    files = model_files(3, big=6 * MiB)
    upload(gcs_server, gcs_bucket, "drop", files)
    # The proxy counts drops per connection, and every emulator reply closes its connection: the first two are the
    # listing's two pages (shorter than 1 MiB, so not cut), the next two are ranged reads, cut after 1 MiB.
    gcs_proxy.faults.drop_after, gcs_proxy.faults.drop_times = 1 * MiB, 4
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/drop", "--dest", str(tmp_path), env=gcs_env)
    assert result.returncode == 0, result.stderr
    assert "retrying" in result.stderr
    assert tree_bytes(published(result)) == files


@pytest.mark.slow
def test_sigkill_mid_sync_resumes_fetching_only_missing_bytes(gcs_server, gcs_bucket, gcs_env, gcs_proxy, tmp_path):
    files = {f"shard-{i}.bin": os.urandom(24 * MiB) for i in range(2)}
    files["config.json"] = b"{}"
    upload(gcs_server, gcs_bucket, "kill", files)
    total = sum(map(len, files.values()))
    gcs_proxy.faults.throttle_bps = 8 * MiB
    process = weightsync_popen("sync", "--source", f"gs://{gcs_bucket}/kill", "--dest", str(tmp_path), env=gcs_env)
    deadline = time.monotonic() + 60
    while gcs_proxy.stats.bytes_down < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = gcs_proxy.stats.bytes_down
    assert total * 0.3 < first < total * 0.9
    assert nothing_published(tmp_path, f"gs--{gcs_bucket}--kill"), "a killed sync must not publish anything"
    gcs_proxy.faults.throttle_bps = None
    gcs_proxy.stats.reset()
    resumed = weightsync("sync", "--source", f"gs://{gcs_bucket}/kill", "--dest", str(tmp_path), env=gcs_env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(published(resumed)) == files
    second = gcs_proxy.stats.bytes_down
    print(f"gs resume: total {total} first run {first} second run {second} missing {total - first}")
    assert second < (total - first) + 0.15 * total, (first, second, total)
    assert "resumed" in resumed.stderr


@pytest.mark.slow
def test_six_processes_on_one_empty_volume_fetch_the_bytes_once(gcs_server, gcs_bucket, gcs_env, gcs_proxy,
                                                                tmp_path):
    files = model_files(4, big=8 * MiB)
    upload(gcs_server, gcs_bucket, "race", files)
    gcs_proxy.faults.throttle_bps = 16 * MiB
    processes = [weightsync_popen("sync", "--source", f"gs://{gcs_bucket}/race", "--dest", str(tmp_path),
                                  env=gcs_env) for _ in range(6)]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, [err for _, err in outputs]
    paths = {out.splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    assert tree_bytes(Path(paths.pop())) == files
    model_bytes = sum(map(len, files.values()))
    # Six listings (a few KiB each) plus the model once.
    assert gcs_proxy.stats.bytes_down <= 1.05 * model_bytes + 6 * 64 * 1024, (gcs_proxy.stats.bytes_down, model_bytes)


# ----------------------------------------------------------------------------------------------------- credentials


@pytest.fixture
def gateway(gcs_server: GcsEmulator):
    """The emulator behind a gateway that records Authorization headers, reached as API_ENDPOINT_OVERRIDE (so the
    source authenticates, as against storage.googleapis.com)."""
    with RecordingGateway(gcs_server.port) as server:
        yield server


@pytest.fixture
def adc_env(gcs_env: dict[str, str], tmp_path: Path, gateway: RecordingGateway) -> dict[str, str]:
    """No emulator host: credentials from Application Default Credentials, with no gcloud ADC file in reach and no
    real metadata server (GCE_METADATA_IP at a closed port unless a test adds its own)."""
    env = {k: v for k, v in gcs_env.items() if k != "STORAGE_EMULATOR_HOST"}
    home = tmp_path / "home"
    (home / ".config" / "gcloud").mkdir(parents=True)
    return {**env, "API_ENDPOINT_OVERRIDE": gateway.url, "HOME": str(home),
            "CLOUDSDK_CONFIG": str(home / ".config" / "gcloud"), "GCE_METADATA_IP": "127.0.0.1:9",
            "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_TIMEOUT": "1", "GCE_METADATA_DETECT_RETRIES": "1",
            "NO_GCE_CHECK": "true"}  # also on a machine that is a GCE VM: google-auth reads its DMI product name


def on_gke(env: dict[str, str]) -> dict[str, str]:
    """`env` where google-auth looks for a metadata server (a GKE pod with Workload Identity)."""
    return {k: v for k, v in env.items() if k != "NO_GCE_CHECK"}


@pytest.mark.parametrize("expires_in", [3600, 1], ids=["token-reused", "token-refreshed-when-expired"])
def test_workload_identity_token_is_sent_as_bearer_and_never_logged(gcs_server, gcs_bucket, adc_env, gateway,
                                                                    tmp_path, expires_in):
    files = model_files(5, big=1 * MiB)
    upload(gcs_server, gcs_bucket, "wi", files)
    with FakeMetadataServer("wi-secret-token-" + os.urandom(8).hex(), expires_in=expires_in) as metadata:
        result = weightsync("sync", "--debug", "--source", f"gs://{gcs_bucket}/wi", "--dest", str(tmp_path),
                            "--log-format", "json", env={**on_gke(adc_env), **metadata.env()})
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published(result)) == files
    assert metadata.issued, "the token came from the metadata server"
    assert all(q.get("scopes") == ["https://www.googleapis.com/auth/devstorage.read_only"]
               for q in metadata.token_queries), metadata.token_queries
    sent = gateway.authorizations
    assert sent and all(header.startswith("Bearer ") for header in sent), sent
    assert {header.removeprefix("Bearer ") for header in sent} <= set(metadata.issued)
    if expires_in == 3600:
        assert len(metadata.issued) == 1, "a valid token is reused, not fetched per request"
    else:  # google-auth treats a token that expires within minutes as expired: each request refreshes it
        assert len(metadata.issued) == len(sent) > 1
        assert len(set(sent)) == len(sent), "every refreshed token was used"
    for token in metadata.issued:
        assert token not in result.stdout + result.stderr


def _service_account_key(path: Path, token_uri: str) -> str:
    """A service-account key file as the console downloads it (a fresh RSA key); returns the private key's PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "test-project", "private_key_id": os.urandom(20).hex(),
        "private_key": pem, "client_email": "reader@test-project.iam.gserviceaccount.com",
        "client_id": "1234567890", "token_uri": token_uri}))
    return pem


def test_bad_or_missing_credentials_exit_3_with_one_clear_line_and_no_secret(gcs_bucket, adc_env, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with RefusingTokenEndpoint() as oauth:
        key_file = tmp_path / "key.json"
        pem = _service_account_key(key_file, f"{oauth.url}/token")
        cases = [
            ({"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json")}, "no usable google credentials"),
            ({"GOOGLE_APPLICATION_CREDENTIALS": str(broken)}, "no usable google credentials"),
            ({"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)}, "google credentials were refused"),
            ({}, "no usable google credentials"),  # nothing at all: no file, no ADC, no metadata server
        ]
        for extra, needle in cases:
            result = weightsync("sync", "--debug", "--source", f"gs://{gcs_bucket}/x", "--dest", str(tmp_path / "v"),
                                env={**adc_env, **extra})
            assert result.returncode == 3, (extra, result.stderr)
            line = error_line(result) if "Traceback" not in result.stderr else result.stderr.strip().splitlines()[-1]
            assert needle in line.lower(), (extra, line)
            body = "".join(pem.splitlines()[1:-1])
            assert not any(piece in result.stdout + result.stderr for piece in (body[:40], body[-40:])), extra


def test_denied_by_the_bucket_exits_3_naming_the_credentials(gcs_bucket, adc_env, gateway, tmp_path):
    gateway.refuse = 403
    with FakeMetadataServer("denied-token-" + os.urandom(8).hex()) as metadata:
        result = weightsync("sync", "--source", f"gs://{gcs_bucket}/x", "--dest", str(tmp_path),
                            env={**on_gke(adc_env), **metadata.env()})
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert "access denied (HTTP 403)" in line and "service account" in line, line
    assert metadata.issued[0] not in result.stderr + result.stdout


def test_without_google_auth_credentials_are_exit_3_with_the_install_hint(gcs_bucket, adc_env, tmp_path):
    shadow = tmp_path / "no-google-auth" / "google" / "auth"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('google-auth is not installed')\n")
    result = weightsync("sync", "--source", f"gs://{gcs_bucket}/x", "--dest", str(tmp_path / "v"),
                        env={**adc_env, "PYTHONPATH": str(shadow.parent.parent)})
    assert result.returncode == 3, result.stderr
    assert "pip install weightsync[gcs]" in error_line(result)


def test_an_emulator_host_without_scheme_is_used_without_credentials(gcs_server, gcs_bucket, gcs_env, tmp_path):
    gcs_server.upload(gcs_bucket, "bare/config.json", b"{}")
    proxy = CountingProxy("127.0.0.1", gcs_server.port)
    try:
        env = {**gcs_env, "STORAGE_EMULATOR_HOST": f"127.0.0.1:{proxy.port}",
               "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "never-read.json")}
        result = weightsync("sync", "--source", f"gs://{gcs_bucket}/bare", "--dest", str(tmp_path), env=env)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.stats.connections > 0


class _Reply:
    """Just enough of connections.Body for GcsSource._status: a status, headers, a JSON error body."""

    def __init__(self, status: int, headers: dict[str, str] | None = None, message: str = "") -> None:
        self.status, self.headers = status, headers or {}
        self._data = json.dumps({"error": {"code": status, "message": message}}).encode() if message else b""

    def read_all(self) -> bytes:
        return self._data

    def close(self) -> None:
        return None


def test_each_status_maps_to_its_exit_code_with_retry_after_and_the_service_message(monkeypatch):
    from weightsync.errors import SourceError, TransientError
    from weightsync.sources.gcs import GcsSource

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    source = GcsSource.from_uri("gs://bucket/models")
    throttled = source._status(_Reply(429, {"retry-after": "7"}), "listing", None)  # type: ignore[arg-type]
    assert isinstance(throttled, TransientError) and throttled.retry_after == 7
    for status in (408, 500, 502, 503, 504):
        assert isinstance(source._status(_Reply(status), "listing", None), TransientError)  # type: ignore[arg-type]
    denied = source._status(_Reply(403, message="reader@p.iam does not have storage.objects.list access"),  # type: ignore[arg-type]
                            "listing gs://bucket/models", None)
    assert isinstance(denied, SourceError) and denied.exit_code == 3
    assert "access denied (HTTP 403): reader@p.iam does not have storage.objects.list access" in str(denied)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(denied)
    missing = source._status(_Reply(404), "listing", "bucket gs://bucket not found")  # type: ignore[arg-type]
    assert isinstance(missing, SourceError) and "bucket gs://bucket not found (HTTP 404)" in str(missing)
