"""--fallback: ordered sources of one model; each published revision comes whole from one source's snapshot."""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, upload_model, weightsync
from tests.support.s3server import free_port
from weightsync.checksums import Promise
from weightsync.config import DEFAULTS
from weightsync.engine import Engine, SyncRequest
from weightsync.errors import SourceError, TransientError
from weightsync.manifest import Manifest
from weightsync.sources import Features, RemoteFile, Selection, Snapshot

MiB = 1024 * 1024
FAST = {"WEIGHTSYNC_RETRY_BASE": "0.01", "WEIGHTSYNC_RETRIES": "2"}


def model_files(seed: int = 0, shards: int = 2, shard: int = 2 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"config.json": b'{"model_type": "tiny", "seed": %d}' % seed, "tokenizer/vocab.txt": b"a\nb\n"}
    files.update({f"model-{i:05d}.safetensors": safetensors_bytes(rng.randbytes(shard)) for i in range(shards)})
    return files


def events(result, kind: str) -> list[dict]:
    """The JSON log events of one kind (the run used --log-format json)."""
    found = []
    for line in result.stderr.splitlines():
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if body.get("event") == kind:
            found.append(body)
    return found


def published_manifest(result) -> tuple[Path, Manifest]:
    path = Path(result.stdout.splitlines()[-1])
    return path, Manifest.load(path.parent.parent / "manifests" / f"{path.name}.json")


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def both_env(s3_env, hub):
    """One process that can reach the test S3 server (through its counting proxy) and the test Hub."""
    return {**s3_env, **hub.env(), **FAST}


def test_primary_s3_endpoint_down_falls_back_to_the_hub_verified_byte_identical_and_logs_why(hub, both_env, tmp_path):
    files = model_files(1)
    commit = hub.add_commit("acme/tiny", files)
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint()}
    result = weightsync("--log-format", "json", "sync", "--source", "s3://mirror/acme/tiny", "--fallback",
                        "hf://acme/tiny", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    path, manifest = published_manifest(result)
    assert path.name == commit and tree_bytes(path) == files
    assert manifest.source == "hf://acme/tiny" and manifest.sources == ["s3://mirror/acme/tiny", "hf://acme/tiny"]
    assert all(entry.evidence and entry.evidence.promise for entry in manifest.files), "verified by the Hub's ids"
    [fallback] = events(result, "source_fallback")
    assert fallback["source"] == "s3://mirror/acme/tiny" and fallback["next_source"] == "hf://acme/tiny"
    assert fallback["stage"] == "resolve" and fallback["exit_code"] == 7 and "gave up after" in fallback["reason"]
    [published] = events(result, "published")
    assert published["from_fallback"] is True and published["primary"] == "s3://mirror/acme/tiny"
    assert published["skipped_sources"][0]["source"] == "s3://mirror/acme/tiny"


def test_primary_lacking_the_prefix_falls_back_and_logs_not_found(s3_server, bucket, hub, both_env, tmp_path):
    files = model_files(2)
    hub.add_commit("acme/tiny", files)
    result = weightsync("--log-format", "json", "sync", "--source", f"s3://{bucket}/no-such-prefix",
                        "--fallback", "hf://acme/tiny", "--dest", str(tmp_path), env=both_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_manifest(result)[0]) == files
    [fallback] = events(result, "source_fallback")
    assert fallback["exit_code"] == 3 and "no objects under" in fallback["reason"]


def test_primary_lacking_the_repo_falls_back_to_s3(s3_server, bucket, hub, both_env, tmp_path):
    files = model_files(3)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    result = weightsync("--log-format", "json", "sync", "--source", "hf://acme/gone", "--fallback",
                        f"s3://{bucket}/acme/tiny", "--name", "tiny", "--dest", str(tmp_path), env=both_env)
    assert result.returncode == 0, result.stderr
    path, manifest = published_manifest(result)
    assert tree_bytes(path) == files and manifest.source == f"s3://{bucket}/acme/tiny"
    [fallback] = events(result, "source_fallback")
    assert fallback["source"] == "hf://acme/gone" and "repo not found" in fallback["reason"]


def test_primary_and_fallback_both_down_exit_7_naming_both(both_env, tmp_path):
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint(), "HF_ENDPOINT": dead_endpoint()}
    result = weightsync("sync", "--source", "s3://mirror/acme/tiny", "--fallback", "hf://acme/tiny",
                        "--dest", str(tmp_path), env=env)
    assert result.returncode == 7, result.stderr
    line = error_line(result)
    assert "no source could be used" in line
    assert "[s3://mirror/acme/tiny]" in line and "[hf://acme/tiny]" in line


def test_every_source_missing_exits_3_naming_each(tmp_path):
    result = weightsync("sync", "--source", str(tmp_path / "a"), "--fallback", str(tmp_path / "b"),
                        "--dest", str(tmp_path / "vol"), "--name", "m")
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert str(tmp_path / "a") in line and str(tmp_path / "b") in line


def test_hub_429_retry_after_is_waited_for_then_succeeds(hub, hub_env, tmp_path):
    files = model_files(4)
    hub.add_commit("acme/tiny", files)
    hub.faults.fail_status, hub.faults.fail_times, hub.faults.retry_after = \
        {"/api/models/acme/tiny/revision": 429}, 2, 2
    started = time.monotonic()
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path),
                        env={**hub_env, "WEIGHTSYNC_RETRY_BASE": "0.01"})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 4.0, "two 429s, each asking for 2 s"
    assert result.stderr.count("HTTP 429") == 2
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_hub_429_as_the_last_fallback_is_waited_for(hub, both_env, tmp_path):
    files = model_files(5)
    hub.add_commit("acme/tiny", files)
    hub.faults.fail_status, hub.faults.fail_times, hub.faults.retry_after = \
        {"/api/models/acme/tiny/revision": 429}, 1, 2
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint(), "WEIGHTSYNC_RETRIES": "3"}
    started = time.monotonic()
    result = weightsync("sync", "--source", "s3://mirror/acme/tiny", "--fallback", "hf://acme/tiny",
                        "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 2.0
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_long_retry_after_with_a_fallback_behind_moves_on_instead_of_waiting(s3_server, bucket, hub, both_env,
                                                                              tmp_path):
    files = model_files(6)
    hub.add_commit("acme/tiny", files)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    hub.faults.fail_status, hub.faults.retry_after = {"/api/models/acme/tiny/revision": 429}, 600
    result = weightsync("--log-format", "json", "sync", "--source", "hf://acme/tiny", "--fallback",
                        f"s3://{bucket}/acme/tiny", "--dest", str(tmp_path), env=both_env)
    assert result.returncode == 0, result.stderr
    path, manifest = published_manifest(result)
    assert tree_bytes(path) == files and manifest.source == f"s3://{bucket}/acme/tiny"
    [fallback] = events(result, "source_fallback")
    assert "retry after 600s" in fallback["reason"] and fallback["exit_code"] == 7
    assert len(hub.find_requests(path_contains="/revision/")) == 1, "a 10-minute ask is not retried"


def test_primary_dying_mid_download_restarts_on_the_fallback_and_publishes_only_its_files(
        s3_server, bucket, hub, both_env, tmp_path):
    from tests.adversarial.harness import FaultProxy

    files = model_files(7, shards=4)
    commit = hub.add_commit("acme/tiny", files)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    proxy = FaultProxy(s3_server.s3_port, dead_after=sum(map(len, files.values())) // 2)
    try:
        env = {**both_env, "AWS_ENDPOINT_URL": proxy.url, "WEIGHTSYNC_CONCURRENCY": "1",
               "WEIGHTSYNC_STALL_TIMEOUT": "1", "WEIGHTSYNC_NO_PROGRESS_TIMEOUT": "3"}
        result = weightsync("--log-format", "json", "sync", "--source", f"s3://{bucket}/acme/tiny", "--fallback",
                            "hf://acme/tiny", "--name", "tiny", "--dest", str(tmp_path), env=env)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    assert proxy.bytes_down > 0
    [fallback] = events(result, "source_fallback")
    assert fallback["stage"] == "download" and fallback["exit_code"] == 7
    path, manifest = published_manifest(result)
    assert path.name == commit and tree_bytes(path) == files
    assert manifest.source == "hf://acme/tiny"
    hub_kinds = {"sha256", "git-sha1"}
    assert {entry.evidence.promise.algorithm for entry in manifest.files} <= hub_kinds, "every file the Hub's"
    served = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path or r.is_cdn}
    assert {name.rsplit("/", 1)[-1] for name in files} <= served, "every file downloaded from the Hub"
    assert [p.name for p in (tmp_path / "tiny" / "revisions").iterdir()] == [commit]


def test_a_source_serving_corrupt_bytes_falls_through_loudly_and_publishes_the_fallback(
        s3_server, bucket, hub, both_env, tmp_path):
    files = model_files(11)
    hub.add_commit("acme/tiny", files)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    hub.faults.corrupt = {"model-00000.safetensors"}
    result = weightsync("--log-format", "json", "sync", "--source", "hf://acme/tiny", "--fallback",
                        f"s3://{bucket}/acme/tiny", "--dest", str(tmp_path), env=both_env)
    assert result.returncode == 0, result.stderr
    path, manifest = published_manifest(result)
    assert tree_bytes(path) == files and manifest.source == f"s3://{bucket}/acme/tiny"
    [fallback] = events(result, "source_fallback")
    assert fallback["level"] == "error" and fallback["exit_code"] == 4 and fallback["stage"] == "download"


def test_hf_hub_offline_drops_an_hf_fallback(tmp_path, clean_env):
    result = weightsync("sync", "--source", str(tmp_path / "missing"), "--fallback", "hf://acme/tiny",
                        "--dest", str(tmp_path / "vol"), "--name", "m", env={**clean_env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 3, result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "hf://acme/tiny" not in error_line(result)


def test_offline_after_a_fallback_sync_finds_the_primary_ref(s3_server, bucket, hub, both_env, tmp_path):
    files = model_files(8)
    hub.add_commit("acme/tiny", files)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    args = ("sync", "--source", "hf://acme/tiny", "--fallback", f"s3://{bucket}/acme/tiny", "--dest", str(tmp_path))
    hub.stop()
    first = weightsync(*args, env=both_env)
    assert first.returncode == 0, first.stderr
    offline = weightsync(*args, "--offline", env=both_env)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


def test_every_source_unreachable_starts_with_the_last_published_revision(hub, both_env, tmp_path):
    files = model_files(9)
    hub.add_commit("acme/tiny", files)
    args = ("--log-format", "json", "sync", "--source", "s3://mirror/acme/tiny", "--fallback", "hf://acme/tiny",
            "--dest", str(tmp_path))
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint()}
    first = weightsync(*args, env=env)
    assert first.returncode == 0, first.stderr
    hub.stop()
    again = weightsync(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    [unreachable] = events(again, "source_unreachable")
    assert unreachable["sources"] == ["s3://mirror/acme/tiny", "hf://acme/tiny"]


def test_pinned_warm_start_with_fallbacks_makes_zero_requests(s3_proxy, hub, both_env, tmp_path):
    files = model_files(10)
    commit = hub.add_commit("acme/tiny", files)
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint()}
    args = ("--source", "s3://mirror/acme/tiny", "--fallback", "hf://acme/tiny", "--dest", str(tmp_path))
    assert weightsync("sync", *args, env=env).returncode == 0
    hub.reset_log()
    s3_proxy.stats.reset()
    for source_first in (args, ("--source", "hf://acme/tiny", "--fallback", "s3://mirror/acme/tiny",
                                "--dest", str(tmp_path))):
        again = weightsync("run", *source_first, "--name", "s3--mirror--acme--tiny", "--revision", commit, "--",
                           "true", env={**both_env})
        assert again.returncode == 0, again.stderr
    hub.wait_idle()
    assert hub.requests == [] and s3_proxy.stats.connections == 0


def test_adding_or_swapping_a_fallback_needs_no_rebind_but_another_primary_exits_2(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("other", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(b"%d" % seed * 100)
    a, b, other = (str(tmp_path / name) for name in ("a", "b", "other"))
    dest = ("--dest", str(tmp_path / "vol"), "--name", "m")
    assert weightsync("sync", "--source", a, *dest).returncode == 0
    for sources in ((a, "--fallback", b), ("/nonexistent-primary", "--fallback", a), (b, "--fallback", a), (a,)):
        result = weightsync("sync", "--source", *sources, *dest)
        assert result.returncode == 0, (sources, result.stderr)
    for sources in ((other,), (other, "--fallback", "/nonexistent-fallback")):
        refused = weightsync("sync", "--source", *sources, *dest)
        assert refused.returncode == 2, refused.stderr
        assert "--rebind" in error_line(refused)
    assert weightsync("sync", "--source", other, "--rebind", *dest).returncode == 0


@pytest.mark.parametrize("flag", ["s3:/bucket/x", "ftp://host/x", "hf://not a repo"])
def test_malformed_fallback_exits_2_in_one_line_naming_the_flag(flag, tmp_path):
    result = weightsync("sync", "--source", str(tmp_path), "--fallback", flag, "--dest", str(tmp_path / "vol"))
    assert result.returncode == 2, result.stderr
    assert "--fallback" in error_line(result)


def test_fallback_from_the_environment_is_comma_separated(tmp_path, clean_env):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "w.bin").write_bytes(b"w")
    env = {**clean_env, "WEIGHTSYNC_FALLBACK": f"{tmp_path / 'missing'}, {tmp_path / 'b'}"}
    result = weightsync("sync", "--source", str(tmp_path / "a"), "--dest", str(tmp_path / "vol"), "--name", "m",
                        env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == {"w.bin": b"w"}
    status = weightsync("status", "--dest", str(tmp_path / "vol"), "--json", env=clean_env)
    [revision] = json.loads(status.stdout)["models"][0]["revisions"]
    assert revision["from_fallback"] is True and revision["primary"] == f"file://{tmp_path / 'a'}"


def test_metrics_and_termination_message_say_the_revision_came_from_the_fallback(tmp_path, clean_env):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "w.bin").write_bytes(b"w")
    metrics, termination = tmp_path / "metrics.prom", tmp_path / "termination"
    result = weightsync("sync", "--source", str(tmp_path / "a"), "--fallback", str(tmp_path / "b"), "--dest",
                        str(tmp_path / "vol"), "--name", "m", "--metrics-textfile", str(metrics),
                        "--termination-log", str(termination), env=clean_env)
    assert result.returncode == 0, result.stderr
    text = metrics.read_text()
    assert 'weightsync_from_fallback{model="m",source_kind="file"} 1.0' in text
    assert 'weightsync_source_fallbacks_total{model="m",source_kind="file"} 1.0' in text
    message = json.loads(termination.read_text())
    assert message["from_fallback"] is True and message["source"] == f"file://{tmp_path / 'b'}"
    assert message["skipped_sources"][0]["source"] == f"file://{tmp_path / 'a'}"


def test_sync_run_and_serve_take_fallback_and_lock_does_not():
    for command in ("sync", "run", "serve"):
        assert "--fallback URI" in weightsync(command, "--help").stdout, command
    refused = weightsync("lock", "--source", "/tmp", "--fallback", "/tmp")  # a lockfile pins one source
    assert refused.returncode == 2 and "unrecognized option '--fallback'" in error_line(refused)


def test_the_same_source_given_twice_exits_2(tmp_path):
    twice = weightsync("sync", "--source", str(tmp_path), "--fallback", str(tmp_path), "--dest", str(tmp_path / "v"))
    assert twice.returncode == 2 and "same source" in error_line(twice)


# -- the engine with in-process sources: a mirror and its origin report the same revision ----------------------
@dataclass
class _Reader:
    data: io.BytesIO
    voids: dict[str, str] = field(default_factory=dict)

    def readinto(self, buffer: memoryview) -> int:
        return self.data.readinto(buffer)

    def close(self) -> None:
        pass


@dataclass
class FakeSource:
    """A source whose revision id is its content's (as a weightsync mirror reports its origin's commit)."""

    uri: str
    files: dict[str, bytes]
    revision: str = "c0ffee" * 6 + "c0ff"
    down: bool = False
    fail_after_files: int | None = None  # open_range fails (not retried away) once this many files were read
    kind: str = "fake"
    default_ref: str | None = None
    features: ClassVar[Features] = Features(promises=frozenset({"sha256"}))
    calls: list[str] = field(default_factory=list)
    read: set[str] = field(default_factory=set)

    @property
    def default_name(self) -> str:
        return "fake-model"

    def pinned_revision(self, revision: str | None) -> str | None:
        return revision if revision == self.revision else None

    def snapshot(self, revision: str | None, selection: Selection) -> Snapshot:
        self.calls.append("snapshot")
        if self.down:
            raise SourceError(f"{self.uri}: not found")
        return Snapshot(revision=self.revision, files=tuple(
            RemoteFile(path, len(data), (Promise("sha256", hashlib.sha256(data).hexdigest(), "fake"),),
                       etag=hashlib.sha256(data).hexdigest(), locator=path)
            for path, data in sorted(self.files.items())))

    def describe(self, file: RemoteFile, thorough: bool = False) -> RemoteFile:
        return file

    def open_range(self, file: RemoteFile, start: int, end: int) -> _Reader:
        self.calls.append(f"read {file.path}")
        if self.fail_after_files is not None and len(self.read) >= self.fail_after_files and file.path not in self.read:
            raise TransientError(f"{self.uri}: connection reset")
        self.read.add(file.path)
        return _Reader(io.BytesIO(self.files[file.locator][start:end]))


def fake_files() -> dict[str, bytes]:
    return {f"shard-{i}.bin": bytes([i]) * (100_000 + i) for i in range(4)}


def _request(tmp_path: Path, revision: str | None = None) -> SyncRequest:
    from dataclasses import replace

    transfer = replace(DEFAULTS, retries=2, retry_base=0.001, fsync=False, progress_interval=0)
    return SyncRequest(source="fake://mirror", dest=tmp_path, revision=revision, transfer=transfer,
                       selection=Selection())


def test_mirror_and_origin_with_the_same_revision_share_one_revision_directory(tmp_path):
    mirror, origin = FakeSource("fake://mirror", fake_files(), down=True), FakeSource("fake://origin", fake_files())
    first = Engine(_request(tmp_path), sources=[mirror, origin]).sync()
    assert first.source == "fake://origin" and first.from_fallback
    mirror.down = False
    second = Engine(_request(tmp_path), sources=[mirror, origin]).sync()
    assert second.path == first.path and second.warm, "the same revision id names the same content"
    assert not [call for call in mirror.calls if call.startswith("read")], "nothing downloaded twice"
    mirror.calls.clear()
    origin.calls.clear()
    pinned = Engine(_request(tmp_path, revision=mirror.revision), sources=[mirror, origin]).sync()
    assert pinned.warm and pinned.path == first.path
    assert mirror.calls == [] and origin.calls == [], "a pinned warm start makes no request to any source"


def test_a_mirror_failing_mid_download_is_finished_from_the_origin_only_with_files_it_promises(tmp_path):
    files = fake_files()
    mirror = FakeSource("fake://mirror", files, fail_after_files=2)
    origin = FakeSource("fake://origin", files)
    result = Engine(_request(tmp_path), sources=[mirror, origin]).sync()
    assert result.source == "fake://origin" and tree_bytes(result.path) == files
    manifest = Manifest.load(result.path.parent.parent / "manifests" / f"{result.path.name}.json")
    assert manifest.source == "fake://origin"
    assert [entry.sha256 for entry in manifest.files] == [hashlib.sha256(files[p]).hexdigest() for p in sorted(files)]
    assert result.skipped and result.skipped[0][0] == "fake://mirror"


def test_a_pinned_warm_start_with_fallbacks_stays_light(s3_proxy, hub, both_env, tmp_path, clean_env):
    from tests.support.helpers import heavy_modules_loaded, modules_loaded
    from tests.test_lazy_imports import NOT_ON_A_PLAIN_WARM_START

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"w" * 1000)
    args = ["sync", "--source", str(folder), "--fallback", str(tmp_path / "elsewhere"), "--dest",
            str(tmp_path / "v"), "--name", "m"]
    revision = Path(weightsync(*args, env=clean_env, check=True).stdout.splitlines()[-1]).name
    code, modules = modules_loaded(*args, "--revision", revision, env=clean_env)
    assert code == 0 and sorted(modules.intersection(NOT_ON_A_PLAIN_WARM_START)) == []

    commit = hub.add_commit("acme/tiny", model_files(12))
    hub_args = ["sync", "--source", "s3://mirror/acme/tiny", "--fallback", "hf://acme/tiny", "--dest",
                str(tmp_path / "hub")]
    assert weightsync(*hub_args, env={**both_env, "AWS_ENDPOINT_URL": dead_endpoint()}).returncode == 0
    code, heavy = heavy_modules_loaded(*hub_args, "--revision", commit, env=both_env)
    assert code == 0 and heavy == []


def test_hf_cache_layout_takes_the_repo_id_of_the_hub_fallback(hub, both_env, tmp_path):
    files = model_files(13)
    commit = hub.add_commit("acme/tiny", files)
    env = {**both_env, "AWS_ENDPOINT_URL": dead_endpoint()}
    result = weightsync("sync", "--layout", "hf-cache", "--source", "s3://mirror/acme/tiny", "--fallback",
                        "hf://acme/tiny", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.splitlines()[-1])
    assert snapshot == tmp_path / "models--acme--tiny" / "snapshots" / commit
    assert tree_bytes(snapshot) == files
    assert (tmp_path / "models--acme--tiny" / "refs" / "main").read_text().strip() == commit


def test_a_denied_mirror_falls_through_to_the_origin_saying_denied(s3_server, bucket, hub, both_env, tmp_path):
    files = model_files(14)
    hub.add_commit("acme/tiny", files)
    upload_model(s3_server.client(), bucket, "acme/tiny", files)
    env = {**both_env, "AWS_SECRET_ACCESS_KEY": "expired-or-wrong-secret-key"}
    result = weightsync("--log-format", "json", "sync", "--source", f"s3://{bucket}/acme/tiny", "--fallback",
                        "hf://acme/tiny", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_manifest(result)[0]) == files
    [fallback] = events(result, "source_fallback")
    assert fallback["exit_code"] == 3 and fallback["level"] == "warning"
    assert "expired-or-wrong-secret-key" not in result.stderr


def test_serve_starts_from_the_fallback_and_returns_to_the_primary_once_it_is_back(tmp_path, clean_env):
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from tests.support.helpers import ROOT

    primary, fallback, dest = tmp_path / "primary", tmp_path / "fallback", tmp_path / "v"
    fallback.mkdir()
    (fallback / "w.bin").write_bytes(b"from the fallback")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "weightsync", "serve", "--source", str(primary), "--fallback", str(fallback),
         "--dest", str(dest), "--name", "m", "--metrics-port", str(port), "--recheck-interval", "0.5"],
        env=clean_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        metrics = ""
        while 'weightsync_ready{model="m",source_kind="file"} 1.0' not in metrics and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                    metrics = response.read().decode()
            except OSError:
                continue
        assert 'weightsync_from_fallback{model="m",source_kind="file"} 1.0' in metrics
        assert (dest / "m" / "current" / "w.bin").read_bytes() == b"from the fallback"
        primary.mkdir()
        (primary / "w.bin").write_bytes(b"from the primary")
        first = os.readlink(dest / "m" / "current")
        while os.readlink(dest / "m" / "current") == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (dest / "m" / "current" / "w.bin").read_bytes() == b"from the primary"
        current = os.readlink(dest / "m" / "current")
        assert Manifest.load(dest / "m" / "manifests" / f"{Path(current).name}.json").source == f"file://{primary}"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
