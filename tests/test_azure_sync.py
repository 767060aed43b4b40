"""Azure Blob Storage source (az://) against Azurite: cold sync, what is verified, resume, races, warm starts, errors.

Blobs are uploaded as users upload them, with azure-storage-blob's `upload_blob`: a small file in one Put Blob (the
service computes its Content-MD5), a large one in blocks (no Content-MD5 unless the uploader sends one), and a
large one with content_settings.content_md5 (as azcopy --put-md5). Expected values are computed here with
hashlib. What Azurite does differently from Azure is written down in tests/support/azurite.py; the tests that
rely on one of those behaviours assert it first.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.server
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.harness import FaultProxy
from tests.support.helpers import error_line, heavy_modules_loaded, tree_bytes, weightsync, weightsync_popen
from weightsync.errors import SourceError, UsageError
from weightsync.logs import redact
from weightsync.sources import Selection, open_source
from weightsync.sources.azure import (
    DEV_ACCOUNT,
    DEV_ENDPOINT,
    AzureSource,
    BearerTokens,
    Settings,
    is_azure_blob_url,
    parse_connection_string,
    shared_key,
)

MiB = 1024 * 1024
ACCOUNT = "devstoreaccount1"
BLOCK = 4 * MiB  # azure-storage-blob's default max_block_size


def uploader(azurite, container: str):
    """A container client with the SDK's defaults, except max_single_put_size lowered from 64 MiB to one block, so
    that a test file of a few MiB takes the path a large model file takes: uneven blocks, no Content-MD5."""
    return azurite.service(max_single_put_size=BLOCK).get_container_client(container)


def upload(azurite, container: str, prefix: str, files: dict[str, bytes], md5: tuple[str, ...] = ()) -> None:
    """Upload each file with upload_blob; the names in `md5` with content_settings.content_md5 (azcopy --put-md5)."""
    from azure.storage.blob import ContentSettings

    client = uploader(azurite, container)
    for name, data in files.items():
        settings = ContentSettings(content_md5=hashlib.md5(data).digest()) if name in md5 else None
        client.upload_blob(f"{prefix}/{name}" if prefix else name, data, content_settings=settings, overwrite=True)


def az(container: str, prefix: str) -> str:
    return f"az://{ACCOUNT}/{container}/{prefix}"


def json_events(stderr: str, kind: str) -> list[dict]:
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == kind]


def published(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def model(seed: int, big: int = 9 * MiB + 12345) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"config.json": b'{"model_type": "tiny", "seed": %d}' % seed, "tokenizer/vocab.txt": b"hello\nworld\n",
            "empty.txt": b"", "model.safetensors": rng.randbytes(big), "model-md5.safetensors": rng.randbytes(big)}


# ----------------------------------------------------------------------------------------------------- cold sync


def test_cold_sync_is_byte_identical_and_reports_md5_where_the_blob_has_one_and_size_only_where_not(
        azurite, container, az_env, tmp_path):
    files = model(1)
    upload(azurite, container, "m", files, md5=("model-md5.safetensors",))
    client = uploader(azurite, container)
    properties = {name: client.get_blob_client(f"m/{name}").get_blob_properties() for name in files}
    # What the service did with each upload (as Azure does): Put Blob sets the MD5, a block upload only if sent one.
    assert bytes(properties["config.json"].content_settings.content_md5) == hashlib.md5(files["config.json"]).digest()
    assert properties["model.safetensors"].content_settings.content_md5 is None
    assert bytes(properties["model-md5.safetensors"].content_settings.content_md5) == \
        hashlib.md5(files["model-md5.safetensors"]).digest()

    result = weightsync("--log-format", "json", "sync", "--source", az(container, "m"), "--dest", str(tmp_path),
                        env=az_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published(result)) == files
    evidence = {e["path"]: e["evidence"] for e in json_events(result.stderr, "file_verified")}
    assert evidence["model.safetensors"].startswith("size only")
    assert {path: label for path, label in evidence.items() if path != "model.safetensors" and path != "empty.txt"} \
        == {"config.json": "md5 (source)", "tokenizer/vocab.txt": "md5 (source)", "model-md5.safetensors":
            "md5 (source)"}
    [summary] = json_events(result.stderr, "published")
    assert "size only" in summary["message"] and "md5 (source)" in summary["message"]
    assert (tmp_path / f"az--{ACCOUNT}--{container}--m" / "current").resolve() == published(result).resolve()


def test_a_uri_naming_one_blob_syncs_that_blob_and_directory_markers_are_skipped(azurite, container, az_env,
                                                                                 tmp_path):
    client = uploader(azurite, container)
    client.upload_blob("gguf/model.gguf", b"GGUF" * 1000)
    client.upload_blob("dm/sub/", b"")
    client.upload_blob("dm/folder", b"", metadata={"hdi_isfolder": "true"})  # an ADLS Gen2 directory
    client.upload_blob("dm/sub/a.bin", b"abc")
    one = weightsync("sync", "--source", az(container, "gguf/model.gguf"), "--dest", str(tmp_path), env=az_env)
    assert one.returncode == 0, one.stderr
    assert tree_bytes(published(one)) == {"model.gguf": b"GGUF" * 1000}
    markers = weightsync("sync", "--source", az(container, "dm"), "--dest", str(tmp_path), env=az_env)
    assert markers.returncode == 0, markers.stderr
    assert tree_bytes(published(markers)) == {"sub/a.bin": b"abc"}


def test_odd_blob_names_arrive_byte_identical(azurite, container, az_env, tmp_path):
    files = {"odd names/wëights+(1)~ä&=%20#?.bin": b"odd" * 100, "Model.bin": b"upper", "model.bin": b"lower",
             "NFC-\u00e9.txt": b"nfc", "NFD-e\u0301.txt": b"nfd", "deep/" * 20 + "leaf.json": b"{}"}
    upload(azurite, container, "odd", files)
    result = weightsync("sync", "--source", az(container, "odd"), "--dest", str(tmp_path), env=az_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published(result)) == files


def test_a_listing_of_many_pages_is_followed_to_its_end(azurite, container, az_env, monkeypatch):
    """NextMarker pagination against the real server, with pages of 3 blobs instead of 5000."""
    names = [f"p/shard-{i:02d}.bin" for i in range(10)]
    client = uploader(azurite, container)
    for name in names:
        client.upload_blob(name, name.encode())
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING=az_env["AZURE_STORAGE_CONNECTION_STRING"])
    monkeypatch.setattr("weightsync.sources.azure.LIST_PAGE", 3)
    listed = open_source(az(container, "p")).snapshot(None, Selection()).files
    assert sorted(f.locator for f in listed) == names


def test_pinned_warm_start_makes_zero_requests_and_imports_no_heavy_module(azurite, container, az_env,
                                                                            azurite_proxy, tmp_path):
    upload(azurite, container, "warm", {"config.json": b"{}", "w.bin": os.urandom(200_000)})
    first = weightsync("sync", "--source", az(container, "warm"), "--dest", str(tmp_path), env=az_env)
    assert first.returncode == 0, first.stderr
    azurite_proxy.stats.reset()
    args = ("sync", "--source", az(container, "warm"), "--revision", published(first).name, "--dest", str(tmp_path))
    second = weightsync(*args, env=az_env)
    assert second.returncode == 0, second.stderr
    assert published(second) == published(first)
    assert azurite_proxy.stats.connections == 0 and azurite_proxy.stats.bytes_down == 0
    code, heavy = heavy_modules_loaded(*args, env=az_env)
    assert code == 0 and heavy == []


@pytest.mark.slow
def test_sigkill_mid_sync_resumes_fetching_only_the_missing_bytes(azurite, container, az_env, azurite_proxy,
                                                                  tmp_path):
    files = {f"shard-{i}.bin": random.Random(i).randbytes(16 * MiB) for i in range(3)}
    files["config.json"] = b"{}"
    upload(azurite, container, "kill", files)
    total = sum(map(len, files.values()))
    azurite_proxy.faults.throttle_bps = 4 * MiB  # per connection: the kill lands near half
    process = weightsync_popen("sync", "--source", az(container, "kill"), "--dest", str(tmp_path), env=az_env)
    deadline = time.monotonic() + 60
    while azurite_proxy.stats.bytes_down < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_run = azurite_proxy.stats.bytes_down
    assert total * 0.3 < first_run < total * 0.9
    name_dir = tmp_path / f"az--{ACCOUNT}--{container}--kill"
    assert not (name_dir / "current").exists(), "a killed sync must not publish anything"

    azurite_proxy.faults.throttle_bps = None
    azurite_proxy.stats.reset()
    resumed = weightsync("sync", "--source", az(container, "kill"), "--dest", str(tmp_path), env=az_env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(published(resumed)) == files
    second_run = azurite_proxy.stats.bytes_down
    print(f"az resume: total {total} first run {first_run} second run {second_run} missing {total - first_run}")
    assert second_run < (total - first_run) + 0.15 * total, (first_run, second_run, total)
    assert "resumed" in resumed.stderr


@pytest.mark.slow
def test_four_processes_on_one_volume_download_the_model_once(azurite, container, az_env, azurite_proxy, tmp_path):
    files = {f"shard-{i}.bin": random.Random(10 + i).randbytes(4 * MiB) for i in range(3)}
    files["config.json"] = b"{}"
    upload(azurite, container, "many", files)
    size = sum(map(len, files.values()))
    azurite_proxy.faults.throttle_bps = 8 * MiB
    azurite_proxy.stats.reset()
    processes = [weightsync_popen("sync", "--source", az(container, "many"), "--dest", str(tmp_path / "vol"),
                                  env=az_env) for _ in range(4)]
    outputs = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1 and tree_bytes(Path(paths.pop())) == files
    assert azurite_proxy.stats.bytes_down <= 1.05 * size, (azurite_proxy.stats.bytes_down, size)
    assert sum("warm start" in err for _, err in outputs) == 3


# ----------------------------------------------------------------------------------------------------- integrity


def test_corrupted_bytes_in_a_blob_with_content_md5_are_exit_4_and_nothing_is_published(azurite, container, az_env,
                                                                                         azurite_proxy, tmp_path):
    files = model(2)
    upload(azurite, container, "bad", files, md5=("model-md5.safetensors",))
    azurite_proxy.faults.corrupt_key = "model-md5.safetensors"
    azurite_proxy.faults.corrupt_offsets = (5 * MiB + 3,)  # inside the second block
    result = weightsync("sync", "--source", az(container, "bad"), "--dest", str(tmp_path), env=az_env)
    assert result.returncode == 4, result.stderr
    assert error_line(result).startswith("weightsync: error: checksum mismatch for model-md5.safetensors")
    name_dir = tmp_path / f"az--{ACCOUNT}--{container}--bad"
    assert not (name_dir / "current").exists()
    assert not (name_dir / "revisions").exists() or not any((name_dir / "revisions").iterdir())


def test_corruption_in_a_blob_without_md5_cannot_be_detected_so_it_is_reported_size_only_and_require_checksum_refuses(
        azurite, container, az_env, azurite_proxy, tmp_path):
    data = random.Random(3).randbytes(9 * MiB + 12345)
    upload(azurite, container, "nomd5", {"model.safetensors": data})
    azurite_proxy.faults.corrupt_key = "model.safetensors"
    azurite_proxy.faults.corrupt_offsets = (5 * MiB + 3,)
    result = weightsync("--log-format", "json", "sync", "--source", az(container, "nomd5"), "--dest",
                        str(tmp_path / "v"), env=az_env)
    # Nothing vouches for these bytes but their size: the flipped byte goes unnoticed, and the report says so.
    assert result.returncode == 0, result.stderr
    got = (published(result) / "model.safetensors").read_bytes()
    assert len(got) == len(data) and got != data
    [verified] = json_events(result.stderr, "file_verified")
    assert verified["evidence"].startswith("size only") and verified["evidence_kind"] == "size-only"
    azurite_proxy.stats.reset()
    refused = weightsync("sync", "--require-checksum", "--source", az(container, "nomd5"), "--dest",
                         str(tmp_path / "v2"), env=az_env)
    assert refused.returncode == 4, refused.stderr
    assert "model.safetensors" in error_line(refused)
    assert azurite_proxy.stats.bytes_down < 100_000, "refused before downloading"


def test_a_stalled_download_with_a_short_stall_timeout_is_exit_7(azurite, container, az_env, tmp_path):
    upload(azurite, container, "stall", {"w.bin": os.urandom(3 * MiB)})
    proxy = FaultProxy(azurite.port, stall_after=256 * 1024, stall_times=-1)
    try:
        env = {**az_env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(f"{proxy.url}/{ACCOUNT}")}
        started = time.monotonic()
        result = weightsync("sync", "--source", az(container, "stall"), "--dest", str(tmp_path), "--stall-timeout",
                            "1", "--retries", "2", "--retry-base", "0.05", env=env, timeout=120)
    finally:
        proxy.close()
    assert result.returncode == 7, result.stderr
    assert "gave up after" in error_line(result)
    assert time.monotonic() - started < 60


def test_a_busy_server_is_retried_after_the_wait_its_retry_after_asks(azurite, container, az_env, tmp_path):
    upload(azurite, container, "busy", {"w.bin": os.urandom(100_000)})
    proxy = FaultProxy(azurite.port, slowdown=1, retry_after=2)  # one 503 with Retry-After: 2, then the server
    try:
        env = {**az_env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(f"{proxy.url}/{ACCOUNT}")}
        result = weightsync("--log-format", "json", "sync", "--source", az(container, "busy"), "--dest",
                            str(tmp_path), "--retry-base", "0.05", env=env)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    [retry] = json_events(result.stderr, "retry")
    assert retry["delay_seconds"] >= 2 and "503" in retry["reason"], retry


# ----------------------------------------------------------------------------------------------------- errors


def test_a_missing_container_or_blob_is_exit_3_saying_which(azurite, container, az_env, tmp_path):
    missing = weightsync("sync", "--source", az("no-such-container", "m"), "--dest", str(tmp_path), env=az_env)
    assert missing.returncode == 3, missing.stderr
    assert "container 'no-such-container' not found in storage account 'devstoreaccount1'" in error_line(missing)
    empty = weightsync("sync", "--source", az(container, "nothing/here.bin"), "--dest", str(tmp_path), env=az_env)
    assert empty.returncode == 3, empty.stderr
    assert f"no blobs under az://{ACCOUNT}/{container}/nothing/here.bin" in error_line(empty)


def _endpoint_only(azurite, az_env) -> str:
    """A connection string that names the endpoint and no credential (so the next one in the order is used)."""
    return az_env["AZURE_STORAGE_CONNECTION_STRING"].split("BlobEndpoint=", 1)[1].rstrip(";")


def _sas(azurite, container: str | None = None) -> str:
    """A read/list SAS signed with the account key, as `az storage ... generate-sas` makes one."""
    from azure.storage.blob import (
        AccountSasPermissions,
        ContainerSasPermissions,
        ResourceTypes,
        generate_account_sas,
        generate_container_sas,
    )

    expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    if container:
        return generate_container_sas(ACCOUNT, container, account_key=azurite.key, expiry=expiry,
                                      permission=ContainerSasPermissions(read=True, list=True))
    return generate_account_sas(ACCOUNT, azurite.key, ResourceTypes(container=True, object=True),
                                AccountSasPermissions(read=True, list=True), expiry)


def _sig(sas: str) -> str:
    return urllib.parse.parse_qs(sas)["sig"][0]


def test_sync_with_a_sas_in_the_uri_or_the_environment_and_an_account_key_from_az_cli_variables(
        azurite, container, az_env, tmp_path):
    files = {"config.json": b"{}", "w.bin": os.urandom(100_000)}
    upload(azurite, container, "auth", files)
    endpoint = {**az_env, "AZURE_STORAGE_CONNECTION_STRING": f"BlobEndpoint={_endpoint_only(azurite, az_env)};"}
    sas = _sas(azurite, container)
    for source, env in [
        (f"{az(container, 'auth')}?{sas}", endpoint),
        (az(container, "auth"), {**endpoint, "AZURE_STORAGE_SAS_TOKEN": "?" + sas}),
        (az(container, "auth"), {**endpoint, "AZURE_STORAGE_KEY": azurite.key, "AZURE_STORAGE_ACCOUNT": ACCOUNT}),
    ]:
        result = weightsync("sync", "--debug", "--source", source, "--dest", str(tmp_path / "v"), env=env)
        assert result.returncode == 0, result.stderr
        assert tree_bytes(published(result)) == files
        assert _sig(sas) not in result.stdout + result.stderr and azurite.key not in result.stdout + result.stderr
    manifests = "".join(p.read_text() for p in (tmp_path / "v").rglob("*.json"))
    assert "sig=" not in manifests and _sig(sas) not in manifests, "the SAS is no part of the recorded source"


@pytest.mark.parametrize("credential", ["wrong account key", "wrong AZURE_STORAGE_KEY", "bad SAS in the URI",
                                        "bad AZURE_STORAGE_SAS_TOKEN"])
def test_bad_credentials_are_exit_3_naming_the_credential_and_never_printing_it(azurite, container, az_env,
                                                                               tmp_path, credential):
    upload(azurite, container, "denied", {"w.bin": b"w" * 1000})
    wrong_key = base64.b64encode(b"wrong" + os.urandom(59)).decode()
    sas = _sas(azurite, container)
    fields = dict(urllib.parse.parse_qsl(sas))
    bad_sas = urllib.parse.urlencode({**fields, "sig": base64.b64encode(os.urandom(32)).decode()})
    assert _sig(bad_sas) != _sig(sas)
    endpoint = f"BlobEndpoint={_endpoint_only(azurite, az_env)};"
    source, env, named, secrets = {
        "wrong account key": (az(container, "denied"), {**az_env, "AZURE_STORAGE_CONNECTION_STRING": (
            azurite.connection_string(_endpoint_only(azurite, az_env), key=wrong_key))},
            "the AccountKey of AZURE_STORAGE_CONNECTION_STRING", [wrong_key]),
        "wrong AZURE_STORAGE_KEY": (az(container, "denied"), {**az_env, "AZURE_STORAGE_CONNECTION_STRING": endpoint,
                                                              "AZURE_STORAGE_KEY": wrong_key}, "AZURE_STORAGE_KEY",
                                    [wrong_key]),
        "bad SAS in the URI": (f"{az(container, 'denied')}?{bad_sas}", {**az_env,
                               "AZURE_STORAGE_CONNECTION_STRING": endpoint}, "the SAS token in --source",
                               [_sig(bad_sas), _sig(sas)]),
        "bad AZURE_STORAGE_SAS_TOKEN": (az(container, "denied"), {**az_env, "AZURE_STORAGE_CONNECTION_STRING": endpoint,
                                        "AZURE_STORAGE_SAS_TOKEN": bad_sas}, "AZURE_STORAGE_SAS_TOKEN",
                                        [_sig(bad_sas)]),
    }[credential]
    result = weightsync("sync", "--source", source, "--dest", str(tmp_path), env=env)
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert "access denied" in line and named in line, line
    debug = weightsync("sync", "--debug", "--source", source, "--dest", str(tmp_path), env=env)
    assert debug.returncode == 3, debug.stderr
    output = result.stdout + result.stderr + debug.stdout + debug.stderr
    for secret in secrets:
        assert secret not in output and urllib.parse.quote(secret, safe="") not in output


def test_a_failing_sync_with_a_sas_in_the_uri_prints_no_sig_value(azurite, container, az_env, tmp_path):
    sas = _sas(azurite)  # an account SAS: the missing container is a 404, not a SAS scoped elsewhere
    env = {**az_env, "AZURE_STORAGE_CONNECTION_STRING": f"BlobEndpoint={_endpoint_only(azurite, az_env)};"}
    args = ("sync", "--source", f"{az('no-such-container', 'm')}?{sas}", "--dest", str(tmp_path))
    result, debug = weightsync(*args, env=env), weightsync("--debug", *args, env=env)
    assert result.returncode == debug.returncode == 3, result.stderr
    assert "not found" in error_line(result)
    output = result.stdout + result.stderr + debug.stdout + debug.stderr
    assert _sig(sas) not in output and urllib.parse.quote(_sig(sas), safe="") not in output
    assert "sig=" not in output.replace("sig=***", "")


def test_redaction_covers_sas_signatures_and_connection_string_secrets(monkeypatch):
    key = base64.b64encode(os.urandom(64)).decode()
    text = redact(f"GET /c/b?sv=2024-08-04&sr=c&sig=abc%2Bdef%3D&se=2026 DefaultEndpointsProtocol=https;"
                  f"AccountName=acct;AccountKey={key};SharedAccessSignature=sv=1&sig=xyz123;EndpointSuffix=x")
    for leaked in ("abc%2Bdef%3D", key, "xyz123"):
        assert leaked not in text, text
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "sv=2024&sp=rl&sig=QWERTYUIOP")
    assert "QWERTYUIOP" not in redact("token sv=2024&sp=rl&sig=QWERTYUIOP")


# ----------------------------------------------------------------------------------------------------- auth, unit


def _environment(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name in [k for k in os.environ if k.startswith(("AZURE_", "IDENTITY_", "MSI_"))]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


KEY = base64.b64encode(b"k" * 64).decode()


@pytest.mark.parametrize(("uri_sas", "env", "kind", "origin"), [
    ("sv=1&sig=a", {"AZURE_STORAGE_SAS_TOKEN": "sv=2&sig=b", "AZURE_STORAGE_KEY": KEY}, "sas",
     "the SAS token in --source"),
    ("", {"AZURE_STORAGE_SAS_TOKEN": "?sv=2&sig=b", "AZURE_STORAGE_CONNECTION_STRING": f"AccountKey={KEY}"}, "sas",
     "AZURE_STORAGE_SAS_TOKEN"),
    ("", {"AZURE_STORAGE_CONNECTION_STRING": "SharedAccessSignature=sv=3&sig=c;AccountName=acct",
          "AZURE_STORAGE_KEY": KEY}, "sas", "the SharedAccessSignature of AZURE_STORAGE_CONNECTION_STRING"),
    ("", {"AZURE_STORAGE_CONNECTION_STRING": f"AccountName=acct;AccountKey={KEY}", "AZURE_STORAGE_KEY": KEY},
     "shared-key", "the AccountKey of AZURE_STORAGE_CONNECTION_STRING"),
    ("", {"AZURE_STORAGE_KEY": KEY, "AZURE_STORAGE_ACCOUNT": "acct"}, "shared-key", "AZURE_STORAGE_KEY"),
    ("", {}, "bearer", "DefaultAzureCredential (azure-identity)"),
], ids=["uri-sas", "env-sas", "connection-sas", "connection-key", "az-cli-key", "default-credential"])
def test_credentials_are_taken_in_the_documented_order(monkeypatch, uri_sas, env, kind, origin):
    _environment(monkeypatch, **env)
    auth = Settings.resolve("acct", uri_sas, "").auth
    assert (auth.kind, auth.origin) == (kind, origin)
    if kind == "sas":
        assert not auth.secret.startswith("?")


def test_endpoints_from_the_uri_the_connection_string_or_azures_default(monkeypatch):
    _environment(monkeypatch)
    assert Settings.resolve("acct", "", "").endpoint == "https://acct.blob.core.windows.net"
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=acct;"
                 f"AccountKey={KEY};EndpointSuffix=core.chinacloudapi.cn")
    assert Settings.resolve("acct", "", "").endpoint == "http://acct.blob.core.chinacloudapi.cn"
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING="UseDevelopmentStorage=true")
    development = Settings.resolve(DEV_ACCOUNT, "", "")
    assert (development.endpoint, development.auth.kind) == (DEV_ENDPOINT, "shared-key")
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING=f"BlobEndpoint=http://127.0.0.1:9/{DEV_ACCOUNT}/;")
    assert Settings.resolve(DEV_ACCOUNT, "", "").endpoint == f"http://127.0.0.1:9/{DEV_ACCOUNT}"
    source = open_source("https://acct.blob.core.windows.net/models/llama?sv=1&sig=secret")
    assert isinstance(source, AzureSource) and source.uri == "az://acct/models/llama" and "sig" not in source.uri


def test_a_credential_for_another_account_is_a_usage_error_unless_a_sas_url_needs_none(monkeypatch):
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING=f"AccountName=other;AccountKey={KEY}")
    with pytest.raises(UsageError, match="account 'other'"):
        Settings.resolve("acct", "", "")
    _environment(monkeypatch, AZURE_STORAGE_KEY=KEY, AZURE_STORAGE_ACCOUNT="other")
    with pytest.raises(UsageError, match="AZURE_STORAGE_ACCOUNT 'other'"):
        Settings.resolve("acct", "", "")
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING=f"AccountName=other;AccountKey={KEY}")
    sas_url = Settings.resolve("acct", "sv=1&sig=a", "https://acct.blob.core.windows.net")  # needs nothing else
    assert sas_url.endpoint == "https://acct.blob.core.windows.net"
    assert sas_url.auth.origin == "the SAS token in --source"
    _environment(monkeypatch, AZURE_STORAGE_KEY="not base64!")
    with pytest.raises(UsageError, match="not a storage account key"):
        Settings.resolve("acct", "", "")


def test_connection_strings_are_parsed_as_the_sdks_parse_them():
    parsed = parse_connection_string(f"defaultendpointsprotocol=https; AccountName=acct;AccountKey={KEY};"
                                     "SharedAccessSignature=sv=1&sig=a%3D;;BlobEndpoint=https://x/")
    assert parsed == {"DefaultEndpointsProtocol": "https", "AccountName": "acct", "AccountKey": KEY,
                      "SharedAccessSignature": "sv=1&sig=a%3D", "BlobEndpoint": "https://x/"}


def test_only_azure_blob_hosts_are_routed_to_this_source():
    assert is_azure_blob_url("https://acct.blob.core.windows.net/c/p")
    assert is_azure_blob_url("HTTPS://Acct.Blob.Core.Windows.Net/c/p?sv=1")
    for other in ("https://example.com/acct.blob.core.windows.net/c", "http://acct.blob.core.windows.net/c",
                  "https://acct.blob.core.windows.net.evil.example/c", "az://acct/c/p", "s3://b/k"):
        assert not is_azure_blob_url(other), other
    with pytest.raises(UsageError, match="az://"):
        open_source("ftp://host/x")
    with pytest.raises(UsageError, match="az://account/container"):
        open_source("az://acct")


@pytest.mark.parametrize("blob", ["models/llama/model-00001-of-00004.safetensors", "odd names/wëights+(1)~ä&=.bin"])
@pytest.mark.parametrize("call", ["list", "get"])
def test_shared_key_signature_matches_azure_storage_blobs_own_policy(blob, call):
    """Our Shared Key signer against azure-storage-blob's SharedKeyCredentialPolicy, on the requests we send."""
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.rest import HttpRequest
    from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy

    key = base64.b64encode(hashlib.sha512(b"test key").digest()).decode()
    headers = {"x-ms-version": "2024-08-04", "x-ms-date": "Tue, 01 Dec 2026 12:00:00 GMT",
               "user-agent": "weightsync/0.1.0"}
    if call == "list":
        path, query = "/models", {"restype": "container", "comp": "list", "include": "metadata",
                                  "prefix": "a b/c+d=é/", "marker": "2!abc=="}
    else:
        path, query = urllib.parse.quote(f"/models/{blob}", safe="/~"), {}
        headers.update({"x-ms-range": "bytes=1048576-2097151", "if-match": '"0x8DB1234567890AB"'})
    ours = shared_key("acct", key, "GET", path, query, headers)
    url = f"https://acct.blob.core.windows.net{path}" + (
        "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote) if query else "")
    request = PipelineRequest(HttpRequest("GET", url, headers=dict(headers)), PipelineContext(None))
    SharedKeyCredentialPolicy("acct", key).on_request(request)
    assert ours == request.http_request.headers["Authorization"]
    signature = base64.b64decode(ours.rsplit(":", 1)[1])
    assert len(signature) == hashlib.sha256().digest_size and hmac.compare_digest(signature, signature)


# ----------------------------------------------------------------------------------------------------- bearer tokens


class _Token:
    def __init__(self, token: str, expires_on: float) -> None:
        self.token, self.expires_on = token, expires_on


class _Credential:
    def __init__(self, lifetime: float) -> None:
        self.lifetime, self.scopes = lifetime, []

    def get_token(self, scope: str) -> _Token:
        self.scopes.append(scope)
        return _Token(f"token-{len(self.scopes)}", time.time() + self.lifetime)


@pytest.mark.parametrize(("lifetime", "fetches"), [(3600, 1), (60, 3)])
def test_bearer_tokens_are_for_storage_and_renewed_only_near_expiry(monkeypatch, lifetime, fetches):
    credential = _Credential(lifetime)
    monkeypatch.setattr("weightsync.sources.azure._default_credential", lambda: credential)
    tokens = BearerTokens()
    headers = [tokens.header() for _ in range(3)]
    assert credential.scopes == ["https://storage.azure.com/.default"] * fetches
    assert headers[-1] == f"Bearer token-{fetches}"


def test_a_default_credential_that_finds_no_identity_is_one_line_exit_3(monkeypatch):
    from azure.core.exceptions import ClientAuthenticationError

    class NoIdentity:
        def get_token(self, scope: str) -> None:
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token.\n"
                                            "Attempted credentials:\n\tEnvironmentCredential: ...")

    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING="BlobEndpoint=http://127.0.0.1:9/acct;")
    monkeypatch.setattr("weightsync.sources.azure._default_credential", NoIdentity)
    with pytest.raises(SourceError) as caught:
        open_source("az://acct/models/m").snapshot(None, Selection())
    message = str(caught.value)
    assert caught.value.exit_code == 3 and "\n" not in message
    assert "DefaultAzureCredential failed to retrieve a token." in message and "AZURE_STORAGE_SAS_TOKEN" in message


def test_default_credential_without_azure_identity_is_exit_3_saying_what_to_install(monkeypatch):
    _environment(monkeypatch, AZURE_STORAGE_CONNECTION_STRING="BlobEndpoint=http://127.0.0.1:9/acct;")
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # what `import` sees where it is not installed
    with pytest.raises(SourceError, match=r"pip install weightsync\[azure\]") as caught:
        open_source("az://acct/models/m").snapshot(None, Selection())
    assert caught.value.exit_code == 3


class _FakeAzure(http.server.ThreadingHTTPServer):
    """Stands for both ends DefaultAzureCredential meets on an App Service or a managed-identity host: the identity
    endpoint (IDENTITY_ENDPOINT / IDENTITY_HEADER, as Azure injects them) and a Blob endpoint that accepts only its
    bearer token. Azurite takes bearer tokens only over HTTPS with --oauth basic and then checks no signature, so
    this proves what is provable on loopback: the token is fetched for storage and sent as `Bearer`."""

    HEADER = "identity-header-" + os.urandom(8).hex()

    def __init__(self, blob: bytes) -> None:
        self.blob, self.token_requests, self.authorizations = blob, [], []
        self.token = "ey.fake-managed-identity-token." + os.urandom(8).hex()
        super().__init__(("127.0.0.1", 0), _FakeAzureHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FakeAzureHandler(http.server.BaseHTTPRequestHandler):
    server: _FakeAzure
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        server = self.server
        if path == "/identity":
            server.token_requests.append((urllib.parse.parse_qs(query), self.headers.get("X-IDENTITY-HEADER")))
            body = json.dumps({"access_token": server.token, "expires_on": str(int(time.time()) + 3600),
                               "resource": "https://storage.azure.com", "token_type": "Bearer"}).encode()
            return self._reply(200, body, Content_Type="application/json")
        server.authorizations.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {server.token}":
            return self._reply(403, b"", x_ms_error_code="AuthenticationFailed")
        if "comp=list" in query:
            md5 = base64.b64encode(hashlib.md5(server.blob).digest()).decode()
            body = (f"<?xml version='1.0'?><EnumerationResults><Blobs><Blob><Name>m/w.bin</Name><Properties>"
                    f"<Etag>0x1</Etag><Content-Length>{len(server.blob)}</Content-Length><Content-MD5>{md5}"
                    "</Content-MD5></Properties></Blob></Blobs><NextMarker/></EnumerationResults>").encode()
            return self._reply(200, body, Content_Type="application/xml")
        start, end = (int(v) for v in self.headers["x-ms-range"].removeprefix("bytes=").split("-"))
        self._reply(206, server.blob[start:end + 1], Content_Range=f"bytes {start}-{end}/{len(server.blob)}")


@pytest.fixture
def fake_azure() -> Iterator[_FakeAzure]:
    server = _FakeAzure(os.urandom(300_000))
    yield server
    server.shutdown()
    server.server_close()


def test_default_azure_credential_managed_identity_token_is_sent_as_bearer(fake_azure, clean_env, tmp_path):
    pytest.importorskip("azure.identity")
    env = {k: v for k, v in clean_env.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    env.update({"AZURE_STORAGE_CONNECTION_STRING": f"BlobEndpoint={fake_azure.url}/acct;",
                "IDENTITY_ENDPOINT": f"{fake_azure.url}/identity", "IDENTITY_HEADER": fake_azure.HEADER})
    result = weightsync("sync", "--debug", "--source", "az://acct/models/m", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert (published(result) / "w.bin").read_bytes() == fake_azure.blob
    [(query, header)] = fake_azure.token_requests
    assert query["resource"] == ["https://storage.azure.com"] and header == fake_azure.HEADER
    assert set(fake_azure.authorizations) == {f"Bearer {fake_azure.token}"}
    assert fake_azure.token not in result.stderr and fake_azure.HEADER not in result.stderr


def _jwt(audience: str, lifetime: float = 3600) -> str:
    """An Entra ID-shaped access token (issuer, audience, lifetime), signed with nothing: what Azurite's
    `--oauth basic` checks, and all it checks."""
    def part(body: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()

    now, tenant = int(time.time()), "72f988bf-86f1-41af-91ab-2d7cd011db47"
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{tenant}/", "iat": now - 60, "nbf": now - 60,
              "exp": int(now + lifetime), "tid": tenant, "oid": "00000000-0000-0000-0000-000000000001"}
    signature = base64.urlsafe_b64encode(os.urandom(256)).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{signature}"


@pytest.fixture(scope="module")
def azurite_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A second Azurite, over HTTPS with a private CA of one, taking OAuth bearer tokens (`--oauth basic`)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tests.support.azurite import REQUIRE_ENV, Azurite, Unavailable

    folder = tmp_path_factory.mktemp("azurite-https")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightsync test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=2))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = Azurite(folder / "data", tls=(cert_path, key_path))
    try:
        server.start()
    except Unavailable as exc:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{exc}, and {REQUIRE_ENV} is set")
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.mark.parametrize(("audience", "accepted"), [("https://storage.azure.com", True),
                                                     ("https://management.azure.com", False)])
def test_a_managed_identity_token_is_accepted_by_azurite_over_https_and_a_token_for_another_audience_is_not(
        azurite_https, fake_azure, clean_env, tmp_path, audience, accepted):
    pytest.importorskip("azure.identity")
    container = f"oauth-{os.urandom(6).hex()}"
    client = azurite_https.service().create_container(container)
    data = os.urandom(300_000)
    client.upload_blob("m/w.bin", data)
    fake_azure.token = _jwt(audience)
    env = {k: v for k, v in clean_env.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "REQUESTS_"))}
    env.update({"AZURE_STORAGE_CONNECTION_STRING": f"BlobEndpoint={azurite_https.endpoint};",
                "IDENTITY_ENDPOINT": f"{fake_azure.url}/identity", "IDENTITY_HEADER": fake_azure.HEADER,
                "REQUESTS_CA_BUNDLE": str(azurite_https.tls[0])})
    result = weightsync("sync", "--source", az(container, "m"), "--dest", str(tmp_path), env=env)
    if accepted:
        assert result.returncode == 0, result.stderr
        assert (published(result) / "w.bin").read_bytes() == data
        assert "1 file md5 (source)" in result.stderr
    else:
        assert result.returncode == 3, result.stderr
        assert "access denied" in error_line(result) and "DefaultAzureCredential" in error_line(result)
    assert fake_azure.token not in result.stdout + result.stderr


def test_an_untrusted_certificate_is_exit_3_naming_requests_ca_bundle(azurite_https, clean_env, tmp_path):
    env = {k: v for k, v in clean_env.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_", "REQUESTS_"))}
    env["AZURE_STORAGE_CONNECTION_STRING"] = azurite_https.connection_string()
    result = weightsync("sync", "--source", az("any", "m"), "--dest", str(tmp_path), env=env)
    assert result.returncode == 3, result.stderr
    assert "TLS certificate is not trusted" in error_line(result) and "REQUESTS_CA_BUNDLE" in error_line(result)
