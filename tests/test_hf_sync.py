"""Hugging Face Hub source against the local Hub server: verified, resumable, safe with many pods."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync, weightsync_popen
from tests.support.hubserver import HubServer

MiB = 1024 * 1024


def repo_files(seed: int = 0, shard: int = 2 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "model-00001-of-00002.safetensors": safetensors_bytes(rng.randbytes(shard)),
        "model-00002-of-00002.safetensors": safetensors_bytes(rng.randbytes(shard // 2)),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "pytorch_model.bin": rng.randbytes(4096),
        "tokenizer/tokenizer.json": b'{"vocab": ["a", "b"]}',
    }


def bytes_served(hub: HubServer) -> int:
    hub.wait_idle()
    return sum(r.bytes_sent for r in hub.requests)


def test_cold_sync_is_byte_identical_follows_the_cdn_redirect_and_paginates(hub, hub_env, tmp_path):
    files = repo_files()
    files.update({f"extra/file-{i:03d}.txt": b"%d" % i for i in range(120)})
    commit = hub.add_commit("acme/tiny", files)
    hub.page_size = 25
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env)
    assert result.returncode == 0, result.stderr
    published = Path(result.stdout.splitlines()[-1])
    assert published == tmp_path / "hf--acme--tiny" / "revisions" / commit
    assert tree_bytes(published) == files
    assert hub.find_requests(path_contains="/cdn/"), "LFS bytes must come through the CDN redirect"
    assert len(hub.find_requests(path_contains="/tree/")) > 1, "the tree listing must be paginated"


def test_revision_in_uri_tag_and_main_moving_upstream(hub, hub_env, tmp_path):
    first = hub.add_commit("acme/tiny", repo_files(1))
    hub.add_tag("acme/tiny", "v1", first)
    second = hub.add_commit("acme/tiny", {"config.json": b'{"v": 2}'})
    tagged = weightsync("sync", "--source", "hf://acme/tiny@v1", "--dest", str(tmp_path), env=hub_env)
    assert tagged.returncode == 0, tagged.stderr
    assert Path(tagged.stdout.splitlines()[-1]).name == first
    main = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env)
    assert Path(main.stdout.splitlines()[-1]).name == second
    assert (Path(main.stdout.splitlines()[-1]) / "config.json").read_bytes() == b'{"v": 2}'
    shard = "model-00001-of-00002.safetensors"
    assert (Path(main.stdout.splitlines()[-1]) / shard).stat().st_ino == \
        (Path(tagged.stdout.splitlines()[-1]) / shard).stat().st_ino, "unchanged LFS files are reused"


def test_pinned_commit_on_the_volume_makes_zero_requests(hub, hub_env, tmp_path):
    commit = hub.add_commit("acme/tiny", repo_files(2))
    assert weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env).returncode == 0
    hub.reset_log()
    again = weightsync("run", "--source", "hf://acme/tiny", "--revision", commit, "--dest", str(tmp_path), "--",
                       "true", env=hub_env)
    assert again.returncode == 0, again.stderr
    hub.wait_idle()
    assert hub.requests == []


def test_offline_with_the_hub_stopped_resolves_the_branch_from_the_last_sync(hub, hub_env, tmp_path):
    commit = hub.add_commit("acme/tiny", repo_files(3))
    assert weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env).returncode == 0
    hub.stop()
    for extra_args, extra_env in ((["--offline"], {}), ([], {"HF_HUB_OFFLINE": "1"})):
        result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), *extra_args,
                            env={**hub_env, **extra_env})
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.splitlines()[-1]).name == commit
    missing = weightsync("sync", "--offline", "--source", "hf://acme/other", "--dest", str(tmp_path), env=hub_env)
    assert missing.returncode == 3
    assert "--offline" in error_line(missing) and "hf://acme/other" in error_line(missing)


@pytest.mark.parametrize("path", ["model-00001-of-00002.safetensors", "config.json"])
def test_corrupted_lfs_and_small_files_are_detected_and_nothing_is_published(hub, hub_env, tmp_path, path):
    hub.add_commit("acme/tiny", repo_files(4))
    hub.faults.corrupt = {path}
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env)
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert f"checksum mismatch for {path}" in line
    assert ("sha256" if path.endswith(".safetensors") else "git-sha1") in line
    assert not (tmp_path / "hf--acme--tiny" / "current").exists()
    assert not list((tmp_path / "hf--acme--tiny").glob("revisions/*"))
    hub.faults.corrupt = set()
    assert weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env).returncode == 0


def test_dropped_connection_mid_body_is_resumed_by_retry(hub, hub_env, tmp_path):
    files = repo_files(5, shard=6 * MiB)
    hub.add_commit("acme/tiny", files)
    hub.faults.drop_after_bytes = 1 * MiB
    hub.faults.drop_times = 2
    hub.faults.only_paths = {"model-00001-of-00002.safetensors"}
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert "retrying" in result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    assert bytes_served(hub) < sum(map(len, files.values())) * 1.1


@pytest.mark.slow
def test_sigkill_at_half_then_resume_fetches_about_the_remaining_bytes(hub, hub_env, tmp_path):
    files = {"a.safetensors": os.urandom(24 * MiB), "b.safetensors": os.urandom(24 * MiB), "config.json": b"{}"}
    total = sum(map(len, files.values()))
    hub.add_commit("acme/big", files)
    hub.faults.throttle_bps = 6 * MiB
    process = weightsync_popen("sync", "--source", "hf://acme/big", "--dest", str(tmp_path), env=hub_env)
    deadline = time.monotonic() + 60
    while sum(r.bytes_sent for r in hub.requests) < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = bytes_served(hub)
    assert not (tmp_path / "hf--acme--big" / "current").exists()
    hub.faults.throttle_bps = None
    hub.reset_log()
    resumed = weightsync("sync", "--source", "hf://acme/big", "--dest", str(tmp_path), env=hub_env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(Path(resumed.stdout.splitlines()[-1])) == files
    second = bytes_served(hub)
    print(f"hf resume: total {total} first run {first} second run {second} missing {total - first}")
    assert second < (total - first) + 0.15 * total


@pytest.mark.slow
def test_six_processes_on_one_empty_volume_fetch_the_bytes_once(hub, hub_env, tmp_path):
    files = repo_files(6, shard=8 * MiB)
    hub.add_commit("acme/tiny", files)
    hub.faults.throttle_bps = 16 * MiB
    processes = [weightsync_popen("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env)
                 for _ in range(6)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 6, [err for _, err in outputs]
    paths = {out.splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    assert tree_bytes(Path(paths.pop())) == files
    model_bytes = sum(map(len, files.values()))
    served = sum(r.bytes_sent for r in hub.requests if "/resolve/" in r.path or r.is_cdn)
    assert served <= 1.05 * model_bytes, (served, model_bytes)


def test_include_exclude_skip_duplicate_weight_formats(hub, hub_env, tmp_path):
    hub.add_commit("acme/tiny", repo_files(7))
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), "--include", "*.safetensors",
                        "--include", "*.json", "--exclude", "*.bin", env=hub_env)
    assert result.returncode == 0, result.stderr
    assert sorted(tree_bytes(Path(result.stdout.splitlines()[-1]))) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer/tokenizer.json"]


def test_not_found_gated_bad_revision_and_bad_token_exit_3_and_say_which(hub, hub_env, tmp_path):
    hub.add_commit("acme/tiny", repo_files(8))
    hub.add_commit("acme/gated", repo_files(8))
    hub.set_access("acme/gated", gated=True)
    hub.add_commit("acme/private", repo_files(8))
    hub.set_access("acme/private", private=True)
    cases = [
        ("hf://acme/missing", {}, [], "not found"),
        ("hf://acme/gated", {}, [], "gated"),
        ("hf://acme/tiny", {}, ["--revision", "no-such-branch"], "revision not found"),
        ("hf://acme/private", {"HF_TOKEN": "hf_wrongtokenvalue123"}, [], "token"),
    ]
    for uri, env_extra, args, needle in cases:
        result = weightsync("sync", "--source", uri, "--dest", str(tmp_path), *args, env={**hub_env, **env_extra})
        assert result.returncode == 3, (uri, result.stderr)
        assert needle in error_line(result).lower(), (uri, result.stderr)
        assert "hf_wrongtokenvalue123" not in result.stderr + result.stdout


def test_private_repo_with_token_works_and_the_token_is_never_logged(hub, hub_env, tmp_path):
    files = repo_files(9)
    hub.add_commit("acme/private", files)
    hub.set_access("acme/private", private=True)
    result = weightsync("sync", "--debug", "--source", "hf://acme/private", "--dest", str(tmp_path),
                        env={**hub_env, "HF_TOKEN": "hf_good_token"})
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files
    assert "hf_good_token" not in result.stderr + result.stdout
    cdn = [r for r in hub.requests if r.is_cdn]
    assert cdn and not any(r.authenticated for r in cdn), "the token must not be forwarded to the CDN"


def test_datasets_uri(hub, hub_env, tmp_path):
    files = {"data/train.parquet": os.urandom(5000), "README.md": b"# data"}
    hub.add_commit("acme/corpus", files, repo_type="dataset")
    result = weightsync("sync", "--source", "hf://datasets/acme/corpus", "--dest", str(tmp_path), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == files


def test_hub_unreachable_starts_with_the_last_published_revision_of_the_branch(hub, hub_env, tmp_path):
    commit = hub.add_commit("acme/tiny", repo_files(10))
    assert weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=hub_env).returncode == 0
    hub.stop()
    env = {**hub_env, "WEIGHTSYNC_RETRIES": "2", "WEIGHTSYNC_RETRY_BASE": "0.01"}
    result = weightsync("sync", "--source", "hf://acme/tiny", "--dest", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1]).name == commit
    assert "unreachable" in result.stderr and "last published revision" in result.stderr
    never = weightsync("sync", "--source", "hf://acme/tiny", "--revision", "v9", "--dest", str(tmp_path), env=env)
    assert never.returncode == 7, never.stderr


def test_each_file_reports_the_hub_promise_it_was_verified_by(hub, hub_env, tmp_path):
    import json

    files = repo_files()
    hub.add_commit("acme/evidence", files)
    result = weightsync("sync", "--source", "hf://acme/evidence", "--dest", str(tmp_path), "--log-format", "json",
                        env=hub_env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    evidence = {e["path"]: e["evidence"] for e in events if e["event"] == "file_verified"}
    assert evidence["model-00001-of-00002.safetensors"] == "sha256 (source)", "LFS files by their sha256"
    assert evidence["config.json"] == "git-sha1 (source)", "small files by their git blob id"
    [published] = [e for e in events if e["event"] == "published"]
    assert sum(published["evidence"].values()) == len(files)
    assert set(published["evidence"]) == {"sha256 (source)", "git-sha1 (source)"}
