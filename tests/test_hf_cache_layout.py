"""`--layout hf-cache`: the model is where huggingface_hub (and so vLLM, TGI, transformers) looks it up by repo id.

Every check of the cache goes through huggingface_hub itself (snapshot_download, hf_hub_download, scan_cache_dir,
delete_revisions), offline, with the test Hub stopped: it is the consumer, not an oracle of ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync, weightsync_popen
from tests.support.hubserver import HubServer

MiB = 1024 * 1024


def model_files(seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "config.json": b'{"model_type": "tiny", "seed": %d}' % seed,
        "model.safetensors": safetensors_bytes(rng.randbytes(3 * MiB)),
        "tokenizer/tokenizer.json": b'{"vocab": ["a", "b"]}',
    }


def slow_model(hub: HubServer, seed: int, shard_mib: int, bytes_per_second: int) -> tuple[dict[str, bytes], str]:
    """A model whose shard is big enough, and served slowly enough, to be caught mid-download."""
    files = model_files()
    files["model.safetensors"] = safetensors_bytes(random.Random(seed).randbytes(shard_mib * MiB))
    commit = hub.add_commit("acme/tiny", files)
    hub.faults.throttle_bps = bytes_per_second
    return files, commit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hf(code: str, cache: Path) -> dict:
    """Run huggingface_hub in a fresh interpreter, offline, against `cache`; the snippet sets `out`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there: any request would fail loudly
    script = "import json, huggingface_hub as h\nout = {}\n" + code + "\nprint(json.dumps(out))"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


SCAN = """
info = h.scan_cache_dir()
out["warnings"] = [str(w) for w in info.warnings]
out["repos"] = [{"id": r.repo_id, "size": r.size_on_disk, "refs": sorted(r.refs), "nb_files": r.nb_files,
                 "revisions": sorted(v.commit_hash for v in r.revisions)} for r in info.repos]
"""


def sync(hub_env: dict[str, str], cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return weightsync("sync", "--layout", "hf-cache", "--dest", str(cache), *args, env=hub_env)


def test_huggingface_hub_finds_the_model_by_repo_id_offline_by_branch_and_by_commit(hub, hub_env, tmp_path):
    files = model_files()
    commit = hub.add_commit("acme/tiny", files)
    cache = tmp_path / "hub"
    result = sync(hub_env, cache, "--source", "hf://acme/tiny")
    assert result.returncode == 0, result.stderr
    snapshot = cache / "models--acme--tiny" / "snapshots" / commit
    assert Path(result.stdout.splitlines()[-1]) == snapshot, "the last stdout line is the snapshot directory"
    hub.stop()

    found = hf(f"""
out["by_branch"] = h.snapshot_download("acme/tiny", local_files_only=True)
out["by_commit"] = h.snapshot_download("acme/tiny", revision="{commit}", local_files_only=True)
out["config"] = h.hf_hub_download("acme/tiny", "config.json", local_files_only=True)
out["nested"] = h.hf_hub_download("acme/tiny", "tokenizer/tokenizer.json", revision="{commit}",
                                  local_files_only=True)
""" + SCAN, cache)
    assert found["by_branch"] == found["by_commit"] == str(snapshot)
    assert found["config"] == str(snapshot / "config.json")
    assert Path(found["nested"]).read_bytes() == files["tokenizer/tokenizer.json"]
    assert found["warnings"] == []
    [repo] = found["repos"]
    assert repo == {"id": "acme/tiny", "size": sum(map(len, files.values())), "refs": ["main"], "nb_files": 3,
                    "revisions": [commit]}
    assert tree_bytes(snapshot) == files
    # huggingface_hub's own layout: relative links into blobs/, named by the LFS sha256 or the git blob sha1
    assert os.readlink(snapshot / "model.safetensors") == \
        "../../blobs/" + hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert os.readlink(snapshot / "tokenizer" / "tokenizer.json") == \
        "../../../blobs/" + git_blob_sha1(files["tokenizer/tokenizer.json"])
    assert (cache / "models--acme--tiny" / "refs" / "main").read_bytes() == commit.encode(), "no newline"
    assert sorted(p.name for p in cache.iterdir()) == [".locks", "CACHEDIR.TAG", "models--acme--tiny"]


def test_a_second_revision_adds_a_snapshot_and_unchanged_files_share_one_blob(hub, hub_env, tmp_path):
    first_files = model_files()
    first = hub.add_commit("acme/tiny", first_files)
    cache = tmp_path / "hub"
    assert sync(hub_env, cache, "--source", "hf://acme/tiny").returncode == 0
    second_files = {**first_files, "config.json": b'{"model_type": "tiny", "moved": true}'}
    second = hub.add_commit("acme/tiny", second_files)
    hub.reset_log()
    result = sync(hub_env, cache, "--source", "hf://acme/tiny")
    assert result.returncode == 0, result.stderr
    assert not hub.find_requests(path_contains="/cdn/"), "the unchanged shard is reused, not downloaded again"
    repo = cache / "models--acme--tiny"
    shard = [repo / "snapshots" / commit / "model.safetensors" for commit in (first, second)]
    assert os.readlink(shard[0]) == os.readlink(shard[1]) and os.path.samefile(*shard)
    assert len(list((repo / "blobs").iterdir())) == 4, "3 files, one changed: 4 blobs"
    hub.stop()
    found = hf(SCAN + f"""
strategy = h.scan_cache_dir().delete_revisions("{first}")
out["freed"] = strategy.expected_freed_size
strategy.execute()
out["after"] = h.snapshot_download("acme/tiny", local_files_only=True)
""", cache)
    assert found["warnings"] == []
    [info] = found["repos"]
    assert info["revisions"] == sorted([first, second]) and info["refs"] == ["main"]
    assert found["freed"] == len(first_files["config.json"]), "only the old config is the old revision's alone"
    assert found["after"] == str(repo / "snapshots" / second)
    assert tree_bytes(repo / "snapshots" / second) == second_files


def test_a_pinned_warm_start_makes_no_request_and_run_points_the_server_at_the_cache(hub, hub_env, tmp_path):
    files = model_files()
    commit = hub.add_commit("acme/tiny", files)
    cache = tmp_path / "hub"
    assert sync(hub_env, cache, "--source", "hf://acme/tiny", "--revision", commit).returncode == 0
    hub.stop()  # nothing may be asked of the Hub now
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('MODEL_DIR', 'HF_HUB_CACHE', " \
           "'HF_HUB_OFFLINE')}))"
    result = weightsync("run", "--layout", "hf-cache", "--dest", str(cache), "--source", "hf://acme/tiny",
                        "--revision", commit, "--", sys.executable, "-c", show, env=hub_env)
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout.splitlines()[-1])
    assert env == {"MODEL_DIR": str(cache / "models--acme--tiny" / "snapshots" / commit),
                   "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    told = weightsync("run", "--layout", "hf-cache", "--dest", str(cache), "--source", "hf://acme/tiny",
                      "--revision", commit, "--", sys.executable, "-c", show,
                      env={**hub_env, "HF_HUB_OFFLINE": "0", "WEIGHTSYNC_OFFLINE": "1"})
    assert told.returncode == 0, told.stderr
    assert json.loads(told.stdout.splitlines()[-1])["HF_HUB_OFFLINE"] == "0", "the user's setting wins"


def test_an_s3_mirror_is_cached_under_its_repo_id_with_main_at_the_listing(s3_server, bucket, s3_env, tmp_path):
    files = model_files(1)
    client = s3_server.client()
    for path, data in files.items():
        client.put_object(Bucket=bucket, Key=f"mirror/{path}", Body=data)
    cache = tmp_path / "hub"
    missing = weightsync("sync", "--layout", "hf-cache", "--source", f"s3://{bucket}/mirror", "--dest", str(cache),
                         env=s3_env)
    assert missing.returncode == 2 and "--repo-id" in error_line(missing)
    result = weightsync("sync", "--layout", "hf-cache", "--repo-id", "acme/mirror", "--source",
                        f"s3://{bucket}/mirror", "--dest", str(cache), env=s3_env)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.splitlines()[-1])
    revision = snapshot.name
    assert snapshot == cache / "models--acme--mirror" / "snapshots" / revision and len(revision) == 20
    found = hf('out["dir"] = h.snapshot_download("acme/mirror", local_files_only=True)\n' + SCAN, cache)
    assert found["dir"] == str(snapshot) and found["warnings"] == []
    assert found["repos"][0]["refs"] == ["main"]
    assert tree_bytes(snapshot) == files


def test_huggingface_hubs_own_blobs_are_reused_when_they_verify_and_replaced_when_they_do_not(hub, hub_env,
                                                                                              tmp_path):
    files = model_files()
    commit = hub.add_commit("acme/tiny", files)
    cache = tmp_path / "hub"
    downloaded = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub as h; print(h.snapshot_download('acme/tiny'))"],
        env={**hub_env, "HF_HUB_CACHE": str(cache)}, capture_output=True, text=True, timeout=120)
    assert downloaded.returncode == 0, downloaded.stderr
    shard_blob = cache / "models--acme--tiny" / "blobs" / hashlib.sha256(files["model.safetensors"]).hexdigest()
    inode = os.stat(shard_blob).st_ino
    hub.reset_log()
    result = sync(hub_env, cache, "--source", "hf://acme/tiny")
    assert result.returncode == 0, result.stderr
    assert not hub.find_requests(path_contains="/cdn/"), "huggingface_hub's verified shard is not fetched again"
    assert os.stat(shard_blob).st_ino == inode, "its blob is kept as it is"

    config_blob = cache / "models--acme--tiny" / "blobs" / git_blob_sha1(files["config.json"])
    damaged = bytearray(config_blob.read_bytes())
    damaged[0] ^= 0xFF
    config_blob.chmod(0o644)
    config_blob.write_bytes(bytes(damaged))
    (cache / "models--acme--tiny" / "snapshots" / commit / "config.json").unlink()  # so the warm check repairs
    again = sync(hub_env, cache, "--source", "hf://acme/tiny")
    assert again.returncode == 0, again.stderr
    assert tree_bytes(cache / "models--acme--tiny" / "snapshots" / commit) == files


def test_sigkill_mid_download_leaves_no_snapshot_huggingface_hub_would_return(hub, hub_env, tmp_path):
    files, commit = slow_model(hub, seed=7, shard_mib=24, bytes_per_second=4 * MiB)
    cache = tmp_path / "hub"
    process = weightsync_popen("sync", "--layout", "hf-cache", "--source", "hf://acme/tiny", "--dest", str(cache),
                               env=hub_env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(r.bytes_sent for r in hub.requests if r.is_cdn) < 6 * MiB:
        time.sleep(0.05)
    time.sleep(0.3)  # resume state is saved every 0.1 s while bytes arrive
    os.kill(process.pid, signal.SIGKILL)
    process.wait(30)
    snapshots = cache / "models--acme--tiny" / "snapshots"
    assert not snapshots.exists() or not any(snapshots.iterdir())
    probe = hf("""
try:
    out["dir"] = h.snapshot_download("acme/tiny", local_files_only=True)
except h.errors.LocalEntryNotFoundError:
    out["dir"] = None
""", cache)
    assert probe["dir"] is None
    hub.faults.throttle_bps = None
    result = weightsync("sync", "--layout", "hf-cache", "--source", "hf://acme/tiny", "--dest", str(cache),
                        "--log-format", "json", env=hub_env)
    assert result.returncode == 0, result.stderr
    [published] = [json.loads(line) for line in result.stderr.splitlines()
                   if line.startswith("{") and json.loads(line)["event"] == "published"]
    assert published["bytes_resumed"] > 0, "the killed sync's bytes are kept"
    assert tree_bytes(snapshots / commit) == files


def test_name_does_not_apply_and_a_bad_repo_id_is_refused(hub, hub_env, tmp_path):
    hub.add_commit("acme/tiny", model_files())
    named = sync(hub_env, tmp_path / "hub", "--source", "hf://acme/tiny", "--name", "mine")
    assert named.returncode == 2 and "--name does not apply" in error_line(named)
    bad = sync(hub_env, tmp_path / "hub", "--source", "hf://acme/tiny", "--repo-id", "acme--x/y")
    assert bad.returncode == 2 and "is not a Hub repo id" in error_line(bad)
    assert not (tmp_path / "hub").exists()


def test_concurrent_syncs_into_one_cache_download_once_and_both_serve_the_snapshot(hub, hub_env, tmp_path):
    files, commit = slow_model(hub, seed=3, shard_mib=12, bytes_per_second=8 * MiB)
    cache = tmp_path / "hub"
    racers = [weightsync_popen("sync", "--layout", "hf-cache", "--source", "hf://acme/tiny", "--dest", str(cache),
                               env=hub_env) for _ in range(2)]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in outputs]
    snapshot = cache / "models--acme--tiny" / "snapshots" / commit
    assert all(out.splitlines()[-1] == str(snapshot) for out, _ in outputs)
    hub.wait_idle()
    shard = sum(r.bytes_sent for r in hub.find_requests(path_contains="/cdn/"))
    assert shard == len(files["model.safetensors"]), "one download of the shard between the two"
    assert tree_bytes(snapshot) == files


def test_status_verify_and_gc_find_the_model_in_the_cache_and_gc_leaves_what_huggingface_hub_serves(
        hub, hub_env, tmp_path):
    first = hub.add_commit("acme/tiny", model_files())
    cache = tmp_path / "hub"
    assert sync(hub_env, cache, "--source", "hf://acme/tiny").returncode == 0
    second = hub.add_commit("acme/tiny", {**model_files(), "config.json": b'{"v": 2}'})
    assert sync(hub_env, cache, "--source", "hf://acme/tiny").returncode == 0
    status = json.loads(weightsync("status", "--dest", str(cache), "--json", env=hub_env, check=True).stdout)
    [model] = status["models"]
    assert model["name"] == "models--acme--tiny" and {r["revision"] for r in model["revisions"]} == {first, second}

    assert weightsync("verify", "--dest", str(cache), env=hub_env).returncode == 0
    shard = cache / "models--acme--tiny" / "snapshots" / second / "model.safetensors"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    os.chmod(os.path.realpath(shard), 0o644)
    Path(os.path.realpath(shard)).write_bytes(bytes(damaged))
    verify = weightsync("verify", "--dest", str(cache), env=hub_env)
    assert verify.returncode == 4 and "--layout hf-cache --repo-id acme/tiny" in error_line(verify), verify.stderr

    gc = weightsync("gc", "--dest", str(cache), "--keep", "0", env=hub_env)
    assert gc.returncode == 0, gc.stderr
    assert f"in the Hugging Face cache as snapshots/{first}" in gc.stderr
    assert (cache / "models--acme--tiny" / "weightsync" / "revisions" / first).is_dir()
    hub.stop()
    hf(f'h.scan_cache_dir().delete_revisions("{first}").execute()', cache)
    gc = weightsync("gc", "--dest", str(cache), "--keep", "0", env=hub_env)
    assert gc.returncode == 0, gc.stderr
    assert not (cache / "models--acme--tiny" / "weightsync" / "revisions" / first).exists()
    assert (cache / "models--acme--tiny" / "weightsync" / "revisions" / second).is_dir(), "current stays"
