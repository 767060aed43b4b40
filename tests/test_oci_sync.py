"""oci:// source against a real registry (Debian's docker-registry, CNCF distribution 2.8), artifacts pushed by the
ORAS SDK as `oras push` does, and hand-built ModelPack manifests: verified by layer digest, resumable, safe with
many pods, pinned warm starts without a request, and one clear line for every refusal."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.adversarial.harness import FaultProxy
from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync, weightsync_popen
from tests.support.proxy import CountingProxy
from tests.support.registry import Registry, TokenServer, running

MiB = 1024 * 1024
OCTET = "application/octet-stream"


def model(seed: int = 0, shard: int = 2 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "model.safetensors": safetensors_bytes(rng.randbytes(shard)),
        "tokenizer/tokenizer.json": b'{"vocab": ["a", "b"]}',
        "empty.txt": b"",
    }


def repo() -> str:
    return f"acme/model-{uuid.uuid4().hex[:8]}"


def last_path(result) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.splitlines()[-1])


@pytest.fixture
def oci_env(clean_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A weightsync process's environment with no credentials but those a test writes to $DOCKER_CONFIG."""
    env = {k: v for k, v in clean_env.items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    (tmp_path / "docker").mkdir()
    return {**env, "DOCKER_CONFIG": str(tmp_path / "docker"), "PYTHONUNBUFFERED": "1"}


def login(env: dict[str, str], host: str, user: str, password: str) -> None:
    """What `docker login host` leaves in config.json."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    Path(env["DOCKER_CONFIG"], "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def test_cold_sync_of_a_tag_is_byte_identical_and_every_file_is_verified_by_its_layer_digest(oci_registry, oci_env,
                                                                                             tmp_path):
    name, files = repo(), model()
    digest = oci_registry.push(f"{name}:v1", files)
    result = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest", str(tmp_path / "v"),
                        "--log-format", "json", env=oci_env)
    published = last_path(result)
    assert published.name == digest.removeprefix("sha256:"), "the revision is the manifest's digest"
    assert tree_bytes(published) == files
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    evidence = {e["path"]: e["evidence"] for e in events if e["event"] == "file_verified"}
    assert set(evidence.values()) == {"sha256 (source)"}
    [done] = [e for e in events if e["event"] == "published"]
    assert done["evidence"] == {"sha256 (source)": len(files)}


def test_a_moved_tag_is_a_new_revision_and_offline_or_a_stopped_registry_starts_the_last_one(oci_env, tmp_path):
    dest = str(tmp_path / "v")
    with running(tmp_path / "registry") as registry:
        name = repo()
        first = registry.push(f"{name}:prod", model(1))
        uri = f"oci://{registry.host}/{name}:prod"
        one = last_path(weightsync("sync", "--source", uri, "--dest", dest, env=oci_env))
        second = registry.push(f"{name}:prod", {**model(1), "config.json": b'{"v": 2}'})
        two = last_path(weightsync("sync", "--source", uri, "--dest", dest, env=oci_env))
        assert (one.name, two.name) == (first.removeprefix("sha256:"), second.removeprefix("sha256:"))
        assert (two / "config.json").read_bytes() == b'{"v": 2}'
        assert (two / "model.safetensors").stat().st_ino == (one / "model.safetensors").stat().st_ino, \
            "an unchanged layer (same digest) is reused, not fetched again"
    offline = weightsync("sync", "--offline", "--source", uri, "--dest", dest, env=oci_env)
    assert last_path(offline).name == two.name
    env = {**oci_env, "WEIGHTSYNC_RETRIES": "2", "WEIGHTSYNC_RETRY_BASE": "0.01"}
    stopped = weightsync("sync", "--source", uri, "--dest", dest, env=env)
    assert last_path(stopped).name == two.name and "last published revision" in stopped.stderr
    never = weightsync("sync", "--offline", "--source", f"oci://{registry.host}/{name}:canary", "--dest", dest,
                       env=oci_env)
    assert never.returncode == 3 and "--offline" in error_line(never)


def test_a_pinned_digest_syncs_cold_and_its_warm_start_makes_zero_requests(oci_registry, oci_env, tmp_path):
    name = repo()
    digest = oci_registry.push(f"{name}:v1", model(2))
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    try:
        pinned = f"oci://{proxy.url.removeprefix('http://')}/{name}@{digest}"
        cold = last_path(weightsync("sync", "--source", pinned, "--dest", str(tmp_path / "v"), env=oci_env))
        assert cold.name == digest.removeprefix("sha256:") and proxy.stats.connections > 0
        proxy.stats.reset()
        warm = weightsync("run", "--source", pinned, "--dest", str(tmp_path / "v"), "--", "true", env=oci_env)
        assert warm.returncode == 0, warm.stderr
        by_flag = weightsync("run", "--source", f"oci://{proxy.url.removeprefix('http://')}/{name}", "--revision",
                             digest, "--dest", str(tmp_path / "v"), "--", "true", env=oci_env)
        assert by_flag.returncode == 0, by_flag.stderr
        assert proxy.stats.connections == 0, "a pinned warm start must not touch the registry"
    finally:
        proxy.close()


def test_a_pinned_digest_the_registry_does_not_hold_exits_3(oci_registry, oci_env, tmp_path):
    name = repo()
    oci_registry.push(f"{name}:v1", model(3))
    wrong = "sha256:" + "0" * 64
    result = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}@{wrong}", "--dest", str(tmp_path),
                        env=oci_env)
    assert result.returncode == 3 and "not found" in error_line(result)


def test_a_lockfile_of_a_tag_keeps_syncing_the_locked_digest_after_the_tag_moves(oci_registry, oci_env, tmp_path):
    name, files = repo(), model(10)
    digest = oci_registry.push(f"{name}:v1", files)
    lock = weightsync("lock", "--source", f"oci://{oci_registry.host}/{name}:v1", env=oci_env)
    assert lock.returncode == 0, lock.stderr
    body = json.loads(lock.stdout)
    assert body["revision"] == digest.removeprefix("sha256:") and len(body["files"]) == len(files)
    (tmp_path / "weightsync.lock").write_text(lock.stdout)
    oci_registry.push(f"{name}:v1", {**files, "config.json": b'{"moved": true}'})
    synced = weightsync("sync", "--lockfile", str(tmp_path / "weightsync.lock"), "--dest", str(tmp_path / "v"),
                        env=oci_env)
    assert last_path(synced).name == body["revision"] and tree_bytes(last_path(synced)) == files


@pytest.mark.slow
def test_sigkill_at_half_then_resume_fetches_about_the_missing_bytes(oci_registry, oci_env, tmp_path):
    name = repo()
    files = {"a.safetensors": os.urandom(16 * MiB), "b.safetensors": os.urandom(16 * MiB), "config.json": b"{}"}
    total = sum(map(len, files.values()))
    oci_registry.push(f"{name}:v1", files)
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    try:
        uri = f"oci://{proxy.url.removeprefix('http://')}/{name}:v1"
        args = ("sync", "--source", uri, "--dest", str(tmp_path / "v"), "--concurrency", "2")
        proxy.faults.throttle_bps = 3 * MiB
        process = weightsync_popen(*args, env=oci_env)
        deadline = time.monotonic() + 60
        while proxy.stats.bytes_down < total // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        first = proxy.stats.bytes_down
        assert not list((tmp_path / "v").glob("*/current")), "killed before publish: nothing is current"
        proxy.faults.throttle_bps = None
        proxy.stats.reset()
        resumed = last_path(weightsync(*args, env=oci_env))
        assert tree_bytes(resumed) == files
        second = proxy.stats.bytes_down
        print(f"oci resume: total {total} first run {first} second run {second} missing {total - first}")
        assert second < (total - first) + 0.15 * total
    finally:
        proxy.close()


@pytest.mark.slow
def test_four_processes_on_one_empty_volume_fetch_the_bytes_once(oci_registry, oci_env, tmp_path):
    name, files = repo(), model(6, shard=8 * MiB)
    oci_registry.push(f"{name}:v1", files)
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    try:
        proxy.faults.throttle_bps = 8 * MiB
        uri = f"oci://{proxy.url.removeprefix('http://')}/{name}:v1"
        processes = [weightsync_popen("sync", "--source", uri, "--dest", str(tmp_path / "v"), env=oci_env)
                     for _ in range(4)]
        outputs = [p.communicate(timeout=120) for p in processes]
        assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
        paths = {out.splitlines()[-1] for out, _ in outputs}
        assert len(paths) == 1 and tree_bytes(Path(paths.pop())) == files
        model_bytes = sum(map(len, files.values()))
        assert proxy.stats.bytes_down <= 1.05 * model_bytes + 64 * 1024, (proxy.stats.bytes_down, model_bytes)
    finally:
        proxy.close()


def test_corrupted_blob_bytes_exit_4_and_nothing_is_published(oci_registry, oci_env, tmp_path):
    name, files = repo(), model(4)
    oci_registry.push(f"{name}:v1", files)
    snapshot = json.loads(oci_registry.request("GET", f"/v2/{name}/manifests/v1", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})[2])
    [big] = [layer["digest"] for layer in snapshot["layers"]
             if layer["annotations"]["org.opencontainers.image.title"] == "model.safetensors"]
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    try:
        proxy.faults.corrupt_key = big
        proxy.faults.corrupt_offsets = (12345,)
        result = weightsync("sync", "--source", f"oci://{proxy.url.removeprefix('http://')}/{name}:v1", "--dest",
                            str(tmp_path), env=oci_env)
        assert result.returncode == 4, result.stderr
        assert "checksum mismatch for model.safetensors" in error_line(result) and "sha256" in error_line(result)
        name_dir = next(tmp_path.iterdir())
        assert not (name_dir / "current").exists() and not list(name_dir.glob("revisions/*"))
    finally:
        proxy.close()


@pytest.mark.parametrize(("media_type", "says"), [
    ("application/vnd.oci.image.layer.v1.tar+gzip", "does not unpack"),
    ("application/vnd.cncf.model.weight.v1.tar", "does not unpack"),
    ("application/vnd.kitops.modelkit.model.v1.tar+gzip", "does not unpack"),
], ids=["oras-directory", "modelpack-tar", "kitops"])
def test_a_layer_that_would_need_unpacking_is_refused_and_nothing_is_published(oci_registry, oci_env, tmp_path,
                                                                               media_type, says):
    name = repo()
    oci_registry.push_manifest_of(name, "v1", [("config.json", OCTET, b"{}"), ("weights", media_type, b"x" * 999)])
    result = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest", str(tmp_path),
                        env=oci_env)
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert says in line and media_type in line and "'weights'" in line
    assert not list(tmp_path.glob("*/revisions/*"))
    excluded = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest", str(tmp_path),
                          "--exclude", "weights", env=oci_env)
    assert tree_bytes(last_path(excluded)) == {"config.json": b"{}"}, "--exclude leaves the archive out"


@pytest.mark.parametrize("title", ["../escape.bin", "/etc/passwd", "a/../../b"])
def test_a_layer_title_that_could_land_outside_the_destination_is_refused(oci_registry, oci_env, tmp_path, title):
    name = repo()
    oci_registry.push_manifest_of(name, "v1", [("config.json", OCTET, b"{}"), (title, OCTET, b"pwned")])
    result = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest",
                        str(tmp_path / "a" / "v"), env=oci_env)
    assert result.returncode == 4, result.stderr
    assert "refusing file" in error_line(result) and repr(title) in error_line(result)
    assert not list(tmp_path.rglob("escape.bin")) and not list(tmp_path.glob("a/v/*/revisions/*"))


def test_two_layers_with_one_title_are_refused(oci_registry, oci_env, tmp_path):
    name = repo()
    oci_registry.push_manifest_of(name, "v1", [("w.bin", OCTET, b"one"), ("w.bin", OCTET, b"two")])
    result = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest", str(tmp_path),
                        env=oci_env)
    assert result.returncode == 4 and "two layers are both titled 'w.bin'" in error_line(result)


def test_a_modelpack_manifest_syncs_by_its_filepath_annotations(oci_registry, oci_env, tmp_path):
    # Media types and annotation from the CNCF ModelPack spec (github.com/modelpack/model-spec: specs-go/v1/
    # mediatype.go, docs/annotations.md); modctl writes layers like these.
    name = repo()
    weights, config = safetensors_bytes(os.urandom(300_000)), b'{"architectures": ["Tiny"]}'
    digest = oci_registry.push_manifest_of(name, "v1", [
        ("model.safetensors", "application/vnd.cncf.model.weight.v1.raw", weights),
        ("config.json", "application/vnd.cncf.model.weight.config.v1.raw", config),
        ("docs/README.md", "application/vnd.cncf.model.doc.v1.raw", b"# tiny"),
    ], artifact_type="application/vnd.cncf.model.manifest.v1+json",
        config_type="application/vnd.cncf.model.config.v1+json", path_annotation="org.cncf.model.filepath")
    published = last_path(weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:v1", "--dest",
                                     str(tmp_path), env=oci_env))
    assert published.name == digest.removeprefix("sha256:")
    assert tree_bytes(published) == {"model.safetensors": weights, "config.json": config, "docs/README.md": b"# tiny"}


def test_an_index_of_one_manifest_is_followed_and_of_several_is_refused_naming_the_digests(oci_registry, oci_env,
                                                                                          tmp_path):
    name = repo()
    one = oci_registry.push_manifest_of(name, "a", [("a.bin", OCTET, b"a")])
    two = oci_registry.push_manifest_of(name, "b", [("b.bin", OCTET, b"b")])
    index_type = "application/vnd.oci.image.index.v1+json"

    def entry(digest: str) -> dict[str, object]:
        data = oci_registry.request("GET", f"/v2/{name}/manifests/{digest}",
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})[2]
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(data)}

    oci_registry.put_manifest(name, "single", {"schemaVersion": 2, "mediaType": index_type,
                                               "manifests": [entry(one)]}, index_type)
    oci_registry.put_manifest(name, "multi", {"schemaVersion": 2, "mediaType": index_type,
                                              "manifests": [entry(one), entry(two)]}, index_type)
    single = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:single", "--dest", str(tmp_path),
                        env=oci_env)
    assert tree_bytes(last_path(single)) == {"a.bin": b"a"}
    multi = weightsync("sync", "--source", f"oci://{oci_registry.host}/{name}:multi", "--dest", str(tmp_path / "m"),
                       env=oci_env)
    assert multi.returncode == 3 and "picks none" in error_line(multi) and two in error_line(multi)


def test_missing_repo_and_tag_exit_3_and_say_which(oci_registry, oci_env, tmp_path):
    name = repo()
    oci_registry.push(f"{name}:v1", model(5))
    for uri in (f"oci://{oci_registry.host}/acme/never-pushed:v1", f"oci://{oci_registry.host}/{name}:v9"):
        result = weightsync("sync", "--source", uri, "--dest", str(tmp_path), env=oci_env)
        assert result.returncode == 3, result.stderr
        assert "not found" in error_line(result) and uri.rsplit("/", 1)[-1] in error_line(result)


def test_basic_auth_from_docker_config_works_and_bad_credentials_exit_3_without_the_secret(oci_env, tmp_path):
    secret = "pw-" + uuid.uuid4().hex
    with running(tmp_path / "registry", htpasswd={"alice": secret}) as registry:
        registry.push_manifest_of("acme/private", "v1", [("w.bin", OCTET, b"w" * 5000)])
        uri = f"oci://{registry.host}/acme/private:v1"
        anonymous = weightsync("sync", "--source", uri, "--dest", str(tmp_path / "v"), env=oci_env)
        assert anonymous.returncode == 3 and oci_env["DOCKER_CONFIG"] in error_line(anonymous)
        login(oci_env, registry.host, "alice", secret + "-wrong")
        wrong = weightsync("sync", "--debug", "--source", uri, "--dest", str(tmp_path / "v"), env=oci_env)
        line = wrong.stderr.strip().splitlines()[-1]  # --debug adds the (redacted) traceback above it
        assert wrong.returncode == 3 and line.startswith("weightsync: error:") and "access denied" in line
        assert "config.json" in line, "the line says where credentials were read from"
        login(oci_env, registry.host, "alice", secret)
        good = weightsync("sync", "--debug", "--source", uri, "--dest", str(tmp_path / "v"), env=oci_env)
        assert tree_bytes(last_path(good)) == {"w.bin": b"w" * 5000}
        for result in (anonymous, wrong, good):
            assert secret not in result.stdout + result.stderr
            assert base64.b64encode(f"alice:{secret}".encode()).decode() not in result.stdout + result.stderr


def test_bearer_token_auth_anonymous_pull_private_repo_and_podman_auth_file(oci_env, tmp_path):
    secret = "tok-" + uuid.uuid4().hex
    token = TokenServer(tmp_path, {"bob": secret}, anonymous_pull=True)
    try:
        with running(tmp_path / "registry", token=token) as registry:
            files = {"w.bin": os.urandom(3 * MiB), "config.json": b"{}"}
            registry.push_manifest_of("acme/public", "v1", [(p, OCTET, d) for p, d in files.items()])
            public = weightsync("sync", "--source", f"oci://{registry.host}/acme/public:v1", "--dest",
                                str(tmp_path / "v"), env=oci_env)
            assert tree_bytes(last_path(public)) == files
            assert len(token.requests) == 1 and token.requests[0]["scope"] == "repository:acme/public:pull", \
                "one anonymous token, cached for every blob"
            token.anonymous_pull = False
            denied = weightsync("sync", "--source", f"oci://{registry.host}/acme/public:v1", "--dest",
                                str(tmp_path / "v2"), env=oci_env)
            assert denied.returncode == 3 and "access denied" in error_line(denied)
            podman = tmp_path / "auth.json"
            podman.write_text(json.dumps({"auths": {registry.host: {
                "auth": base64.b64encode(f"bob:{secret}".encode()).decode()}}}))
            env = {**oci_env, "REGISTRY_AUTH_FILE": str(podman)}
            private = weightsync("sync", "--debug", "--source", f"oci://{registry.host}/acme/public:v1", "--dest",
                                 str(tmp_path / "v2"), env=env)
            assert tree_bytes(last_path(private)) == files
            assert token.requests[-1]["user"] == "bob"
            podman.write_text(json.dumps({"auths": {registry.host: {
                "auth": base64.b64encode(b"bob:wrong").decode()}}}))
            wrong = weightsync("sync", "--source", f"oci://{registry.host}/acme/public:v1", "--dest",
                               str(tmp_path / "v3"), env=env)
            assert wrong.returncode == 3 and "token service refused" in error_line(wrong)
            assert str(podman) in error_line(wrong)
            for result in (public, denied, private, wrong):
                assert secret not in result.stdout + result.stderr
    finally:
        token.close()


def test_a_blob_that_stalls_gives_up_with_exit_7(oci_registry, oci_env, tmp_path):
    name = repo()
    oci_registry.push(f"{name}:v1", {"w.bin": os.urandom(2 * MiB)})
    proxy = FaultProxy(oci_registry.port, stall_after=256 * 1024, stall_times=-1)
    try:
        env = {**oci_env, "WEIGHTSYNC_RETRY_BASE": "0.05"}
        result = weightsync("sync", "--source", f"oci://{proxy.url.removeprefix('http://')}/{name}:v1", "--dest",
                            str(tmp_path), "--stall-timeout", "1", "--retries", "2", env=env, timeout=90)
        assert result.returncode == 7, result.stderr
        assert "w.bin" in error_line(result)
    finally:
        proxy.close()


def test_docker_hub_names_plain_http_and_bad_references_are_resolved_as_docker_does():
    from weightsync.errors import UsageError
    from weightsync.sources.oci import OciSource

    hub = OciSource.from_uri("oci://docker.io/ubuntu:24.04")
    assert (hub.base, hub.default_ref) == ("https://registry-1.docker.io/v2/library/ubuntu", "24.04")
    assert OciSource.from_uri("oci://ghcr.io/acme/llama").base == "https://ghcr.io/v2/acme/llama"
    assert OciSource.from_uri("oci://localhost:5000/m").base.startswith("http://localhost:5000/")
    plain = OciSource.from_uri("oci+http://registry.internal:5000/team/m:v1")
    assert plain.base == "http://registry.internal:5000/v2/team/m" and plain.uri.startswith("oci+http://")
    digest = "sha256:" + "ab" * 32
    pinned = OciSource.from_uri(f"oci://ghcr.io/acme/llama@{digest}")
    assert pinned.pinned_revision(None) == "ab" * 32 and pinned.pinned_revision(digest) == "ab" * 32
    assert OciSource.from_uri("oci://ghcr.io/acme/llama").pinned_revision("v1") is None
    with pytest.raises(UsageError) as caught:
        OciSource.from_uri("oci://bob:hunter2secret@ghcr.io/acme/llama")
    assert "hunter2secret" not in str(caught.value) and "config.json" in str(caught.value)
    for bad in ("oci://ghcr.io/Acme/Llama", "oci://ghcr.io/acme/llama@sha512:abc", "oci://ghcr.io/acme/x:bad tag"):
        with pytest.raises(UsageError):
            OciSource.from_uri(bad)


def test_a_mistyped_oci_scheme_gets_a_hint_and_unknown_schemes_list_oci():
    from weightsync.errors import UsageError
    from weightsync.sources import open_source

    with pytest.raises(UsageError, match=re.escape("did you mean oci://ghcr.io/acme/llama")):
        open_source("oci:/ghcr.io/acme/llama")
    with pytest.raises(UsageError, match="oci://registry/repo:tag"):
        open_source("ftp://x/y")


def test_a_registry_the_credential_helper_knows_is_read_through_it(tmp_path, monkeypatch):
    from weightsync.sources.oci import registry_credentials

    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread server\n[ "$server" = "ghcr.io" ] || exit 1\n'
                      'echo \'{"ServerURL": "ghcr.io", "Username": "carol", "Secret": "helper-secret"}\'\n')
    helper.chmod(0o755)
    (tmp_path / "config.json").write_text(json.dumps({"credHelpers": {"ghcr.io": "fake"}, "auths": {}}))
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    found = registry_credentials("ghcr.io")
    assert (found.username, found.password) == ("carol", "helper-secret") and "docker-credential-fake" in found.origin
    assert registry_credentials("quay.io").username == ""
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "desktop-not-installed", "auths": {}}))
    assert registry_credentials("ghcr.io").username == "", "a Docker Desktop store absent from a pod: anonymous"


def test_registry_fixture_is_the_real_distribution(oci_registry: Registry):
    status, headers, _ = oci_registry.request("GET", "/v2/")
    assert status == 200 and headers.get("docker-distribution-api-version") == "registry/2.0"


def test_blobs_follow_the_registrys_redirect_to_s3_and_the_token_stays_with_the_registry(s3_server, s3_env, bucket,
                                                                                       oci_env, tmp_path):
    # distribution with S3 storage answers a blob GET with 307 to a presigned URL, as ECR, Docker Hub and GHCR do.
    from tests.support.registry import RecordingProxy

    storage = RecordingProxy("127.0.0.1", s3_server.s3_port)
    token = TokenServer(tmp_path, {}, anonymous_pull=True)
    try:
        s3 = {"endpoint": storage.url, "bucket": bucket, "accesskey": s3_env["AWS_ACCESS_KEY_ID"],
              "secretkey": s3_env["AWS_SECRET_ACCESS_KEY"]}
        with running(tmp_path / "registry", token=token, s3=s3) as registry:
            files = {"w.bin": os.urandom(2 * MiB + 17), "config.json": b"{}"}
            registry.push_manifest_of("acme/redirected", "v1", [(p, OCTET, d) for p, d in files.items()])
            result = weightsync("sync", "--source", f"oci://{registry.host}/acme/redirected:v1", "--dest",
                                str(tmp_path / "v"), env=oci_env)
            assert tree_bytes(last_path(result)) == files
        ours = [head for head in storage.heads if "user-agent: weightsync/" in head.lower()]
        assert ours and all("x-amz-signature=" in head.split("\r\n", 1)[0].lower() for head in ours), \
            "the blobs came from S3 through the presigned redirect"
        assert not any("\nauthorization:" in head.lower() for head in ours), "the registry token went to S3"
    finally:
        token.close()
        storage.close()


def test_an_identity_token_is_exchanged_by_the_oauth2_refresh_grant(oci_env, tmp_path):
    identity = "idt-" + uuid.uuid4().hex
    token = TokenServer(tmp_path, {})
    token.refresh_tokens[identity] = "erin"
    try:
        with running(tmp_path / "registry", token=token) as registry:
            registry.push_manifest_of("acme/idt", "v1", [("w.bin", OCTET, b"w" * 1000)])
            Path(oci_env["DOCKER_CONFIG"], "config.json").write_text(json.dumps(
                {"auths": {registry.host: {"auth": "", "identitytoken": identity}}}))
            result = weightsync("sync", "--source", f"oci://{registry.host}/acme/idt:v1", "--dest", str(tmp_path),
                                env=oci_env)
            assert tree_bytes(last_path(result)) == {"w.bin": b"w" * 1000}
            assert token.requests[-1]["grant_type"] == "refresh_token" and token.requests[-1]["user"] == "erin"
            assert identity not in result.stdout + result.stderr
    finally:
        token.close()


def test_503_with_retry_after_is_retried_and_the_sync_completes(oci_registry, oci_env, tmp_path):
    name, files = repo(), model(8)
    oci_registry.push(f"{name}:v1", files)
    proxy = FaultProxy(oci_registry.port, slowdown=2, retry_after=1)
    try:
        result = weightsync("sync", "--source", f"oci://{proxy.url.removeprefix('http://')}/{name}:v1", "--dest",
                            str(tmp_path), env={**oci_env, "WEIGHTSYNC_RETRY_BASE": "0.05"})
        assert tree_bytes(last_path(result)) == files
        assert "retrying" in result.stderr and "503" in result.stderr
    finally:
        proxy.close()


def test_a_manifest_whose_bytes_do_not_match_its_digest_is_refused_with_exit_4(oci_registry, oci_env, tmp_path):
    name = repo()
    oci_registry.push(f"{name}:v1", model(9))
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    try:
        proxy.faults.corrupt_key = "/manifests/v1"
        proxy.faults.corrupt_offsets = (40,)
        result = weightsync("sync", "--source", f"oci://{proxy.url.removeprefix('http://')}/{name}:v1", "--dest",
                            str(tmp_path), env=oci_env)
        assert result.returncode == 4, result.stderr
        assert "the registry says sha256:" in error_line(result)
        assert not list(tmp_path.glob("*/revisions/*"))
    finally:
        proxy.close()


def test_credentials_are_never_sent_to_a_plain_http_token_realm_of_an_https_registry():
    from weightsync.errors import SourceError
    from weightsync.sources.oci import Credentials, OciSource

    source = OciSource.from_uri("oci://ghcr.io/acme/llama")
    with pytest.raises(SourceError, match="plain http"):  # refused before any connection is made
        source._fetch_token({"realm": "http://auth.example/token", "service": "ghcr.io"},
                            Credentials(username="u", password="secret-password", origin="test"), "resolving")


def test_docker_hub_logins_are_found_under_their_v1_key_and_podmans_file_comes_first(tmp_path, monkeypatch):
    from weightsync.sources.oci import auth_files, registry_credentials

    def auth(pair: str) -> dict[str, str]:
        return {"auth": base64.b64encode(pair.encode()).decode()}

    docker, runtime = tmp_path / "docker", tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    docker.mkdir()
    (docker / "config.json").write_text(json.dumps({"auths": {"https://index.docker.io/v1/": auth("dock:one"),
                                                              "ghcr.io": auth("dock:two")}}))
    (runtime / "containers" / "auth.json").write_text(json.dumps({"auths": {"ghcr.io": auth("pod:three")}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    assert auth_files() == [str(runtime / "containers" / "auth.json"), str(docker / "config.json")]
    assert (registry_credentials("docker.io").username, registry_credentials("docker.io").password) == ("dock", "one")
    assert registry_credentials("ghcr.io").password == "three", "podman's auth.json first, as podman reads it"
    assert registry_credentials("quay.io").origin == "", "nothing stored: anonymous"
