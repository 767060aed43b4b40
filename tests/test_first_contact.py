"""First contact: what a new user and a new cluster run into before anything else.

Kubernetes service-link variables, one name meaning one model, folders that share a basename, repairs that
fetch only what is damaged, read-only published files, an honest `gc`, and a CLI that teaches.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from tests.support.helpers import error_line, safetensors_bytes, tree_bytes, weightsync

MiB = 1024 * 1024


def events(result: subprocess.CompletedProcess[str], kind: str) -> list[dict[str, object]]:
    """The JSON log events of one kind (the run used --log-format json)."""
    found = []
    for line in result.stderr.splitlines():
        if line.startswith("{"):
            body = json.loads(line)
            if body.get("event") == kind:
                found.append(body)
    return found


def published_path(result: subprocess.CompletedProcess[str]) -> Path:
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.splitlines()[-1])


@pytest.fixture
def folder_model(tmp_path: Path) -> Path:
    source = tmp_path / "src" / "m"
    source.mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "model.safetensors").write_bytes(safetensors_bytes(os.urandom(3 * MiB)))
    (source / "tokenizer.json").write_text('{"t": 1}')
    return source


# -- 1. Kubernetes service links -----------------------------------------------------------------------------
def kubernetes_service_env(service: str, cluster_ip: str, ports: list[tuple[str, int]]) -> dict[str, str]:
    """The variables the kubelet injects for one Service (pkg/kubelet/envvars FromServices), written out
    here from Kubernetes' rules, independently of weightsync's own matcher."""
    prefix = service.upper().replace("-", "_").replace(".", "_")
    env = {f"{prefix}_SERVICE_HOST": cluster_ip, f"{prefix}_SERVICE_PORT": str(ports[0][1])}
    for name, port in ports:
        if name:
            env[f"{prefix}_SERVICE_PORT_{name.upper().replace('-', '_')}"] = str(port)
    env[f"{prefix}_PORT"] = f"tcp://{cluster_ip}:{ports[0][1]}"
    for _, port in ports:
        base = f"{prefix}_PORT_{port}_TCP"
        env.update({base: f"tcp://{cluster_ip}:{port}", f"{base}_PROTO": "tcp", f"{base}_PORT": str(port),
                    f"{base}_ADDR": cluster_ip})
    return env


@pytest.mark.parametrize("service", ["weightsync", "weightsync-llama", "weightsync-metrics"])
def test_service_link_variables_of_a_weightsync_service_do_not_stop_a_sync(service, folder_model, tmp_path,
                                                                          clean_env):
    links = kubernetes_service_env(service, "10.96.12.34", [("http", 80), ("metrics", 9400)])
    assert any(name.startswith("WEIGHTSYNC_") for name in links)
    env = {**clean_env, **links, **kubernetes_service_env("kubernetes", "10.96.0.1", [("https", 443)])}
    result = weightsync("sync", "--source", str(folder_model), "--dest", str(tmp_path / "v"), env=env)
    assert tree_bytes(published_path(result)) == tree_bytes(folder_model)
    assert "error" not in result.stderr


def test_service_link_shaped_name_with_a_value_kubernetes_never_injects_is_still_a_typo(folder_model, tmp_path,
                                                                                      clean_env):
    env = {**clean_env, "WEIGHTSYNC_METRIC_PORT": "9400"}  # meant WEIGHTSYNC_METRICS_PORT
    result = weightsync("sync", "--source", str(folder_model), "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 2
    assert "did you mean WEIGHTSYNC_METRICS_PORT" in error_line(result)


def test_ipv6_service_links_are_recognised(folder_model, tmp_path, clean_env):
    links = kubernetes_service_env("weightsync", "fd00:10:96::1234", [("http", 80)])
    result = weightsync("sync", "--source", str(folder_model), "--dest", str(tmp_path / "v"),
                        env={**clean_env, **links})
    assert result.returncode == 0, result.stderr


# -- 2. one name, one meaning --------------------------------------------------------------------------------
def test_a_filtered_sync_under_the_same_name_is_refused_and_current_is_unchanged(folder_model, tmp_path,
                                                                               clean_env):
    dest = tmp_path / "v"
    full = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), "--name", "m",
                                     env=clean_env))
    current = dest / "m" / "current"
    before = os.readlink(current)
    filtered = weightsync("sync", "--source", str(folder_model), "--dest", str(dest), "--name", "m",
                          "--include", "*.json", env=clean_env)
    assert filtered.returncode == 2
    line = error_line(filtered)
    assert "--name" in line and "--rebind" in line and "--include '*.json'" in line and "(every file)" in line
    assert os.readlink(current) == before
    assert tree_bytes(current) == tree_bytes(full) == tree_bytes(folder_model)


def test_a_filtered_sync_without_a_name_gets_its_own_directory(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    full = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    filtered = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest),
                                         "--include", "*.json", env=clean_env))
    full_model, filtered_model = full.parent.parent, filtered.parent.parent
    assert full_model != filtered_model
    assert sorted(tree_bytes(filtered_model / "current")) == ["config.json", "tokenizer.json"]
    assert tree_bytes(full_model / "current") == tree_bytes(folder_model)


def test_another_source_under_the_same_name_needs_rebind(folder_model, tmp_path, clean_env):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"other": true}')
    dest = tmp_path / "v"
    published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), "--name", "m",
                              env=clean_env))
    refused = weightsync("sync", "--source", str(other), "--dest", str(dest), "--name", "m", env=clean_env)
    assert refused.returncode == 2
    assert str(other) in error_line(refused)
    assert tree_bytes(dest / "m" / "current") == tree_bytes(folder_model)
    rebound = weightsync("sync", "--source", str(other), "--dest", str(dest), "--name", "m", env={
        **clean_env, "WEIGHTSYNC_REBIND": "1"})
    assert tree_bytes(published_path(rebound)) == tree_bytes(other)
    assert tree_bytes(dest / "m" / "current") == tree_bytes(other)


# -- 3. folders that share a basename -------------------------------------------------------------------------
def test_two_folders_with_the_same_basename_are_two_models(folder_model, tmp_path, clean_env):
    twin = tmp_path / "elsewhere" / "m"
    twin.mkdir(parents=True)
    (twin / "config.json").write_text('{"twin": true}')
    dest = tmp_path / "v"
    first = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    second = published_path(weightsync("sync", "--source", str(twin), "--dest", str(dest), env=clean_env))
    assert first.parent.parent != second.parent.parent
    assert first.parent.parent.name.startswith("file--m-") and second.parent.parent.name.startswith("file--m-")
    assert tree_bytes(first.parent.parent / "current") == tree_bytes(folder_model)
    assert tree_bytes(second.parent.parent / "current") == tree_bytes(twin)


# -- 4. repair fetches only what is damaged ------------------------------------------------------------------
@pytest.fixture
def s3_model(s3_server, bucket: str) -> dict[str, bytes]:
    """A model uploaded as people upload them: boto3's upload_file defaults (multipart above 8 MiB)."""
    files = {"model.safetensors": safetensors_bytes(os.urandom(20 * MiB + 12345)),
             "config.json": b'{"hidden": 8}', "generation.bin": os.urandom(8)}
    client = s3_server.client()
    with tempfile.TemporaryDirectory() as scratch:
        for name, data in files.items():
            path = Path(scratch, name)
            path.write_bytes(data)
            client.upload_file(str(path), bucket, f"llm/{name}", Config=TransferConfig())
    return files


def damage(path: Path, offset: int) -> None:
    """Flip one byte of a published (read-only) file, as a bad disk or a careless `chmod +w; edit` would."""
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(("damaged", "offset"), [("generation.bin", 3), ("model.safetensors", 15 * MiB)])
def test_repair_fetches_only_the_damaged_file(damaged, offset, s3_model, bucket, s3_env, s3_proxy, tmp_path):
    dest = tmp_path / "v"
    args = ("sync", "--source", f"s3://{bucket}/llm", "--dest", str(dest), "--name", "llm", "--log-format",
            "json")
    published = published_path(weightsync(*args, env=s3_env))
    damage(published / damaged, offset)
    s3_proxy.stats.reset()
    repaired = weightsync(*args, "--verify", "full", env=s3_env)
    assert tree_bytes(published_path(repaired)) == s3_model
    (summary,) = events(repaired, "published")
    size = len(s3_model[damaged])
    assert summary["bytes_fetched"] == size
    assert summary["bytes_reused"] == sum(map(len, s3_model.values())) - size
    assert s3_proxy.stats.bytes_down < size + 256 * 1024, "only the damaged file crosses the network"
    warnings = [line for line in repaired.stderr.splitlines() if "damaged" in line]
    assert len(warnings) == 1, f"the damage is reported once:\n{repaired.stderr}"


def test_a_truncated_file_is_repaired_by_a_fast_warm_start_alone(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    published = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest),
                                           env=clean_env))
    (published / "tokenizer.json").chmod(0o644)
    (published / "tokenizer.json").write_text("{")
    result = weightsync("sync", "--source", str(folder_model), "--dest", str(dest), "--log-format", "json",
                        env=clean_env)
    assert tree_bytes(published_path(result)) == tree_bytes(folder_model)
    (summary,) = events(result, "published")
    assert summary["bytes_fetched"] == len(b'{"t": 1}')


# -- 5. published files are read-only ------------------------------------------------------------------------
def test_published_files_are_read_only_and_their_owner_cannot_write_them(folder_model, clean_env):
    with tempfile.TemporaryDirectory(prefix="weightsync-ro-", dir="/tmp") as scratch:
        os.chmod(scratch, 0o755)  # reachable by the unprivileged user below
        published = published_path(weightsync("sync", "--source", str(folder_model), "--dest",
                                               f"{scratch}/v", env=clean_env))
        files = [p for p in published.rglob("*") if p.is_file()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o222 == 0 for p in files)
        target = published / "config.json"
        if os.geteuid() == 0:  # root ignores modes: hand the file to nobody and try as its owner
            os.chown(target, 65534, 65534)
            attempt = subprocess.run(["/bin/sh", "-c", f"printf x >> {shlex.quote(str(target))}"], user=65534,
                                     capture_output=True, text=True)
            assert attempt.returncode != 0 and "Permission denied" in attempt.stderr
            os.chmod(target, 0o644)  # the same attempt succeeds once the file is writable: the mode is what stops it
            assert subprocess.run(["/bin/sh", "-c", f"printf x >> {shlex.quote(str(target))}"], user=65534,
                                  capture_output=True).returncode == 0
        else:
            with pytest.raises(PermissionError), open(target, "r+b"):
                pass


# -- 6. gc says what it really frees ---------------------------------------------------------------------------
def gc_freed(dest: Path, env: dict[str, str], *flags: str) -> int:
    result = weightsync("gc", "--dest", str(dest), "--keep", "1", "--log-format", "json", *flags, env=env)
    assert result.returncode == 0, result.stderr
    (summary,) = events(result, "gc")
    assert summary["revisions_removed"] == 1
    return int(summary["bytes_freed"])  # type: ignore[arg-type]


def test_gc_counts_files_still_linked_from_the_kept_revision_as_not_freed(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    (folder_model / "config.json").write_text('{"a": 2}')  # a new revision; the 3 MiB shard is hardlinked
    second = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    assert (second / "model.safetensors").stat().st_nlink == 2
    assert gc_freed(dest, clean_env) < 64 * 1024
    assert (second / "model.safetensors").read_bytes() == (folder_model / "model.safetensors").read_bytes()


def test_gc_counts_a_file_no_kept_revision_links_as_freed_and_a_dry_run_says_so_first(folder_model, tmp_path,
                                                                                     clean_env):
    dest = tmp_path / "v"
    first = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    (folder_model / "model.safetensors").write_bytes(safetensors_bytes(os.urandom(3 * MiB)))
    published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    would = gc_freed(dest, clean_env, "--dry-run")
    assert first.is_dir() and tree_bytes(first), "a dry run removes nothing"
    assert gc_freed(dest, clean_env) == would >= 3 * MiB
    assert not first.exists()


# -- 7. verify knows what the volume holds ---------------------------------------------------------------------
def test_verify_needs_no_source_and_a_failure_prints_the_repair_command(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    published = published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest),
                                           "--include", "*.safetensors", "--include", "config.json",
                                           env=clean_env))
    assert weightsync("verify", "--dest", str(dest), env=clean_env).returncode == 0
    damage(published / "model.safetensors", 1000)
    failed = weightsync("verify", "--dest", str(dest), env=clean_env)
    assert failed.returncode == 4
    line = error_line(failed)
    assert "model.safetensors: sha256 mismatch" in line
    command = shlex.split(line.split("`")[-2])
    assert command[:2] == ["weightsync", "sync"] and "--verify" in command
    repaired = weightsync(*command[1:], env=clean_env)
    assert published_path(repaired) == published
    assert weightsync("verify", "--dest", str(dest), env=clean_env).returncode == 0


def test_verify_on_a_volume_with_several_models_asks_for_a_name(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    for name in ("a", "b"):
        published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), "--name", name,
                                  env=clean_env))
    result = weightsync("verify", "--dest", str(dest), env=clean_env)
    assert result.returncode == 2
    assert "2 models (a, b)" in error_line(result) and "--name" in error_line(result)
    assert weightsync("verify", "--dest", str(dest), "--name", "b", env=clean_env).returncode == 0


def test_verify_without_a_source_refuses_filters_it_would_ignore(folder_model, tmp_path, clean_env):
    dest = tmp_path / "v"
    published_path(weightsync("sync", "--source", str(folder_model), "--dest", str(dest), env=clean_env))
    result = weightsync("verify", "--dest", str(dest), "--include", "*.json", env=clean_env)
    assert result.returncode == 2
    assert "--include/--exclude only say which model" in error_line(result)


# -- 8-13. the CLI teaches -----------------------------------------------------------------------------------
def test_log_format_and_debug_may_come_before_the_command(folder_model, tmp_path, clean_env):
    result = weightsync("--log-format", "json", "sync", "--source", str(folder_model), "--dest",
                        str(tmp_path / "v"), env=clean_env)
    published_path(result)
    assert events(result, "published")


def test_a_command_option_before_the_command_says_where_it_goes(clean_env):
    result = weightsync("--dest", "/tmp/x", "sync", env=clean_env)
    assert result.returncode == 2
    assert "--dest goes after the command: `weightsync sync --dest" in error_line(result)


@pytest.mark.parametrize(("typed", "suggested"), [("--concurency", "--concurrency"), ("--conc", "--concurrency"),
                                                  ("--lock-timout", "--lock-timeout")])
def test_a_mistyped_or_abbreviated_flag_is_refused_with_a_suggestion(typed, suggested, clean_env, tmp_path):
    result = weightsync("sync", "--source", "/tmp", "--dest", str(tmp_path / "v"), typed, "4", env=clean_env)
    assert result.returncode == 2
    assert f"did you mean {suggested}" in error_line(result)
    assert not (tmp_path / "v").exists()


def test_a_flag_given_twice_with_two_values_is_refused(tmp_path, clean_env):
    result = weightsync("sync", "--source", "/a", "--source", "/b", "--dest", str(tmp_path / "v"), env=clean_env)
    assert result.returncode == 2
    assert "--source is given twice ('/a' and '/b')" in error_line(result)


def test_run_without_the_double_dash_says_where_the_command_goes(folder_model, tmp_path, clean_env):
    result = weightsync("run", "--source", str(folder_model), "--dest", str(tmp_path / "v"), "python", "-m",
                        "http.server", env=clean_env)
    assert result.returncode == 2
    assert "after `--`" in error_line(result)


def test_an_s3_revision_that_was_never_synced_is_a_missing_revision_not_a_changed_source(
        s3_model, bucket, s3_env, tmp_path):
    result = weightsync("sync", "--source", f"s3://{bucket}/llm", "--dest", str(tmp_path / "v"), "--revision",
                        "0123456789abcdef0123", env=s3_env)
    assert result.returncode == 3
    line = error_line(result)
    assert "never synced onto" in line and "no longer matches" not in line


def test_a_pinned_revision_whose_source_changed_is_an_integrity_error(s3_model, s3_server, bucket, s3_env,
                                                                      tmp_path):
    args = ("sync", "--source", f"s3://{bucket}/llm", "--dest", str(tmp_path / "v"), "--name", "llm")
    published = published_path(weightsync(*args, env=s3_env))
    s3_server.client().put_object(Bucket=bucket, Key="llm/config.json", Body=b'{"hidden": 9}')
    published.rename(tmp_path / "moved-away")  # this volume knows the revision (its manifest stays) but lost it
    result = weightsync(*args, "--revision", published.name, env=s3_env)
    assert result.returncode == 4
    assert "no longer matches the pinned revision" in error_line(result)


@pytest.mark.parametrize("revision", ["garbage rev!!", "a..b", "x.lock", "-bad~1"])
def test_an_impossible_hub_revision_is_refused_without_a_request(revision, tmp_path, clean_env):
    env = {**clean_env, "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens: any request would retry, exit 7
    result = weightsync("sync", "--source", "hf://owner/model", "--dest", str(tmp_path / "v"),
                        f"--revision={revision}", env=env)
    assert result.returncode == 2, result.stderr
    assert "cannot be a Hub branch, tag or commit" in error_line(result)
    assert result.stderr.strip().count("\n") == 0, "refused before anything else is logged"


def test_a_bare_repo_id_hints_at_hf_and_s3(tmp_path, clean_env):
    result = weightsync("sync", "--source", "meta-llama/Llama-3.1-8B", "--dest", str(tmp_path / "v"),
                        env=clean_env)
    assert result.returncode == 3
    assert "hf://meta-llama/Llama-3.1-8B" in error_line(result)


@pytest.mark.parametrize(("typed", "meant"), [("s3:/bucket/llm", "s3://bucket/llm"), ("hf:owner/name",
                                                                                        "hf://owner/name")])
def test_a_scheme_with_a_slash_missing_is_not_taken_for_a_folder(typed, meant, tmp_path, clean_env):
    result = weightsync("sync", "--source", typed, "--dest", str(tmp_path / "v"), env=clean_env)
    assert result.returncode == 2
    assert f"did you mean {meant}?" in error_line(result)


def test_help_shows_defaults_choices_groups_exit_codes_and_model_dir(clean_env):
    top = weightsync("--help", env=clean_env).stdout
    assert "exit codes:" in top and "127" in top and "WEIGHTSYNC_LOCK_TIMEOUT" in top
    sync = weightsync("sync", "--help", env=clean_env).stdout
    assert "--log-format {text,json}" in sync and "(default: 8)" in sync
    assert "required (a flag or its variable):\n  --dest DIR" in sync
    assert "network and speed:" in sync and "locking:" in sync
    run = weightsync("run", "--help", env=clean_env).stdout
    assert "MODEL_DIR" in run and "{MODEL_DIR}" in run
    gc = weightsync("gc", "--help", env=clean_env).stdout
    assert "--source" not in gc and "source" not in gc.split("--name", 1)[1].split("\n\n")[0]


def test_run_says_what_it_checked_before_exec(folder_model, tmp_path, clean_env):
    result = weightsync("run", "--source", str(folder_model), "--dest", str(tmp_path / "v"), "--",
                        sys.executable, "-c", "pass", env=clean_env)
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if "checked before exec" in line]
    assert "1 safetensors file" in line


@pytest.fixture
def no_safetensors(tmp_path: Path) -> Iterator[Path]:
    source = tmp_path / "plain"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"x" * 10)
    yield source


def test_run_says_when_there_was_nothing_to_check(no_safetensors, tmp_path, clean_env):
    result = weightsync("run", "--source", str(no_safetensors), "--dest", str(tmp_path / "v"), "--",
                        sys.executable, "-c", "pass", env=clean_env)
    assert result.returncode == 0, result.stderr
    assert "no safetensors files, nothing to check" in result.stderr
