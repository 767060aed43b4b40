"""Bad input: every flag and env var is validated (one `weightsync: error:` line, exit 2); a malformed or tampered
manifest or resume state on the volume is detected and repaired by re-verifying, never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.adversarial.harness import last_path, model, ws
from tests.support.helpers import error_line, tree_bytes

BASE = ["sync", "--source", "/tmp", "--dest", "/tmp/ws-bad-input"]
BAD_FLAGS = [
    ("--concurrency", ["0", "513", "many", "1.5", ""]),
    ("--lock-timeout", ["-1", "nan", "inf", "soon"]),
    ("--stall-timeout", ["0", "-1", "nan", "inf", "86401", "x"]),
    ("--progress-interval", ["-5", "nan"]),
    ("--verify", ["sometimes"]),
    ("--s3-addressing-style", ["dns"]),
    ("--lock-mode", ["nfs", ""]),
    ("--lease-timeout", ["0", "-3", "inf"]),
    ("--retries", ["0", "101", "lots"]),
    ("--retry-base", ["-0.1", "nan"]),
    ("--name", ["../escape", "a/b", ".hidden", "x" * 201, ""]),
    ("--source", ["", "ftp://host/x", "s3://", "hf://not a repo", "hf://../../x"]),
    ("--dest", [""]),
]
CASES = [(flag, value) for flag, values in BAD_FLAGS for value in values]


@pytest.mark.parametrize(("flag", "value"), CASES, ids=[f"{f}={v[:12]!r}" for f, v in CASES])
def test_every_bad_flag_value_exits_2_with_one_line(flag, value, clean_env):
    args = [a for a in BASE if a != flag]
    if flag in ("--source", "--dest"):
        args = BASE[:]
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    result = ws(*args, env=clean_env)
    assert result.returncode == 2, (flag, value, result.stderr)
    line = error_line(result)
    assert flag in line or "scheme" in line or "Hub repo" in line or "bucket" in line, line


ENV_CASES = [(f, v) for f, v in CASES if f not in ("--source", "--dest", "--name")][::2]


@pytest.mark.parametrize(("flag", "value"), ENV_CASES)
def test_every_bad_env_value_exits_2_naming_the_variable(flag, value, clean_env):
    name = "WEIGHTSYNC_" + flag.lstrip("-").replace("-", "_").upper()
    result = ws(*BASE, env={**clean_env, name: value})
    assert result.returncode == 2, (name, value, result.stderr)
    assert name in error_line(result)


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("WEIGHTSYNC_OFFLINE", "maybe", "WEIGHTSYNC_OFFLINE"),
    ("WEIGHTSYNC_DEBUG", "verbose", "WEIGHTSYNC_DEBUG"),
    ("WEIGHTSYNC_CONCURENCY", "4", "did you mean WEIGHTSYNC_CONCURRENCY"),
    ("WEIGHTSYNC_STALL_TIMOUT", "5", "did you mean WEIGHTSYNC_STALL_TIMEOUT"),
])
def test_bad_switches_and_misspelt_env_vars_exit_2(name, value, needle, clean_env):
    result = ws(*BASE, env={**clean_env, name: value})
    assert result.returncode == 2, result.stderr
    assert needle in error_line(result)


@pytest.mark.parametrize(("args", "needle"), [
    (["gc", "--dest", "/tmp"], "--keep is required"),
    (["gc", "--dest", "/tmp", "--keep", "-1"], "--keep"),
    (["gc", "--dest", "/tmp", "--keep", "1", "--staging-older-than", "-5"], "--staging-older-than"),
    (["gc", "--dest", "/nonexistent/ws", "--keep", "1"], "not a directory"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x", "--revision", "latest"], "--revision"),
])
def test_gc_and_revision_arguments_are_validated(args, needle, clean_env):
    result = ws(*args, env=clean_env)
    assert result.returncode == 2, result.stderr
    assert needle in error_line(result)


# -- tampered state on the volume ---------------------------------------------------------------------------------
@pytest.fixture
def published(hub, hub_env, tmp_path):
    files = model(81, shards=2, shard_size=400_000)
    commit = hub.add_commit("acme/tamper", files)
    result = ws("sync", "--source", "hf://acme/tamper", "--dest", str(tmp_path / "v"), env=hub_env)
    assert result.returncode == 0, result.stderr
    return tmp_path / "v", tmp_path / "v" / "hf--acme--tamper", commit, files


def _manifest(name_dir: Path, commit: str) -> Path:
    return name_dir / "manifests" / f"{commit}.json"


def _tamper(kind: str, path: Path, commit: str) -> None:
    body = json.loads(path.read_text())
    if kind == "garbage":
        path.write_text("{not json")
        return
    if kind == "truncated":
        path.write_text(path.read_text()[:40])
        return
    if kind == "other-revision":
        body["revision"] = "0" * 40
    elif kind == "escaping-path":
        body["files"][0]["path"] = "../../etc/passwd"
    elif kind == "duplicate-path":
        body["files"].append(body["files"][0])
    elif kind == "size":
        body["files"][0]["size"] += 1
    elif kind == "bad-sha":
        body["files"][0]["sha256"] = "z" * 64
    elif kind == "bool-size":
        body["files"][0]["size"] = True
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "other-revision", "escaping-path", "duplicate-path",
                                  "size", "bad-sha", "bool-size"])
def test_a_tampered_manifest_is_detected_and_repaired(published, hub_env, kind):
    dest, name_dir, commit, files = published
    _tamper(kind, _manifest(name_dir, commit), commit)
    result = ws("sync", "--source", "hf://acme/tamper", "--revision", commit, "--dest", str(dest), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert "re-verifying" in result.stderr or "damaged" in result.stderr, result.stderr
    assert "warm start" not in result.stderr
    assert tree_bytes(last_path(result)) == files
    verify = ws("verify", "--source", "hf://acme/tamper", "--revision", commit, "--dest", str(dest), env=hub_env)
    assert verify.returncode == 0, verify.stderr


def test_a_tampered_sha256_in_the_manifest_is_caught_by_verify_full(published, hub_env):
    dest, name_dir, commit, _files = published
    path = _manifest(name_dir, commit)
    body = json.loads(path.read_text())
    body["files"][0]["sha256"] = "0" * 64  # same sizes: the fast warm check cannot see it, a full one must
    path.write_text(json.dumps(body))
    verify = ws("verify", "--source", "hf://acme/tamper", "--revision", commit, "--dest", str(dest), env=hub_env)
    assert verify.returncode == 4 and "sha256 mismatch" in error_line(verify)
    repaired = ws("sync", "--verify", "full", "--source", "hf://acme/tamper", "--revision", commit, "--dest",
                  str(dest), env=hub_env)
    assert repaired.returncode == 0, repaired.stderr
    assert "damaged" in repaired.stderr
    assert ws("verify", "--source", "hf://acme/tamper", "--revision", commit, "--dest", str(dest),
              env=hub_env).returncode == 0


def _staging(hub, commit: str, dest: Path, path: str, data: bytes):
    from weightsync.checksums import Promise
    from weightsync.config import DEFAULTS
    from weightsync.download import FileDownload
    from weightsync.sources import RemoteFile

    info = hub.file_info("acme/tamper", path, commit)
    remote = RemoteFile(path=path, size=info["size"], promises=(Promise("sha256", info["sha256"], "lfs"),),
                        etag=info["sha256"])
    staging = dest / "hf--acme--tamper" / ".staging" / commit
    (staging / "parts").mkdir(parents=True, exist_ok=True)
    (staging / "tree").mkdir(parents=True, exist_ok=True)
    return FileDownload(remote, staging / "parts", staging / "tree", DEFAULTS)


@pytest.mark.parametrize("kind", ["chunks-claimed-done", "complete-file-swapped", "garbage-state"])
def test_tampered_resume_state_is_reverified_and_repaired_in_the_same_run(hub, hub_env, tmp_path, kind):
    files = model(82, shards=2, shard_size=400_000)
    commit = hub.add_commit("acme/tamper", files)
    dest = tmp_path / "v"
    path = "model-00001-of-00002.bin"
    download = _staging(hub, commit, dest, path, files[path])
    wrong = b"\0" * len(files[path])
    if kind == "chunks-claimed-done":  # the state says every chunk is on disk; the bytes are not the file's
        download.part.path.write_bytes(wrong)
        download.state.done = set(range(len(download.chunks)))
        download.state_path.write_bytes(download.state.to_json())
    elif kind == "complete-file-swapped":  # verified earlier, then replaced in staging before publish
        (download.tree_dir / path).write_bytes(wrong)
        import hashlib

        download.state.sha256 = hashlib.sha256(files[path]).hexdigest()
        download.state_path.write_bytes(download.state.to_json())
    else:
        download.part.path.write_bytes(wrong)
        download.state_path.write_text('{"version": 1, "done": "all"')
    result = ws("sync", "--source", "hf://acme/tamper", "--dest", str(dest), env=hub_env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(last_path(result)) == files
    if kind != "garbage-state":
        assert ("verification" in result.stderr and "downloading it again" in result.stderr) \
            or "re-downloading" in result.stderr, result.stderr
