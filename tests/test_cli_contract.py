"""The CLI contract, at subprocess level: exit codes, the one error line, stdout, env vars, exec."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.helpers import error_line, tree_bytes, weightsync


@pytest.fixture
def folder_model(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "weights.bin").write_bytes(os.urandom(300_000))
    (source / "sub" / "extra.txt").write_text("x")
    return source


def test_sync_prints_the_published_directory_as_last_stdout_line(folder_model, tmp_path, clean_env):
    result = weightsync("sync", "--source", str(folder_model), "--dest", str(tmp_path / "vol"), env=clean_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and Path(lines[-1]).is_absolute()
    assert tree_bytes(Path(lines[-1])) == tree_bytes(folder_model)
    assert "published" in result.stderr, "logs and progress go to stderr"


def test_file_uri_and_plain_path_are_the_same_source(folder_model, tmp_path, clean_env):
    a = weightsync("sync", "--source", f"file://{folder_model}", "--dest", str(tmp_path / "v"), env=clean_env)
    b = weightsync("sync", "--source", str(folder_model), "--dest", str(tmp_path / "v"), env=clean_env)
    assert a.returncode == b.returncode == 0
    assert a.stdout.splitlines()[-1] == b.stdout.splitlines()[-1]
    assert "warm start" in b.stderr


def test_options_come_from_env_and_a_flag_wins(folder_model, tmp_path, clean_env):
    env = {**clean_env, "WEIGHTSYNC_SOURCE": str(folder_model), "WEIGHTSYNC_DEST": str(tmp_path / "envvol"),
           "WEIGHTSYNC_INCLUDE": "*.json, sub/*", "WEIGHTSYNC_NAME": "from-env"}
    result = weightsync("sync", env=env)
    assert result.returncode == 0, result.stderr
    published = Path(result.stdout.splitlines()[-1])
    assert published.parent.parent == tmp_path / "envvol" / "from-env"
    assert sorted(tree_bytes(published)) == ["config.json", "sub/extra.txt"]
    flag = weightsync("sync", "--name", "from-flag", "--include", "*.bin", env=env)
    assert flag.returncode == 0, flag.stderr
    assert sorted(tree_bytes(Path(flag.stdout.splitlines()[-1]))) == ["weights.bin"]
    assert "from-flag" in flag.stdout


@pytest.mark.parametrize(("args", "env_extra", "needle"), [
    (["sync", "--dest", "/tmp/x"], {}, "--source is required"),
    (["sync", "--source", "s3://b/p"], {}, "--dest is required"),
    (["sync", "--source", "ftp://x/y", "--dest", "/tmp/x"], {}, "unsupported source scheme"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x", "--concurrency", "0"], {}, "--concurrency"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x"], {"WEIGHTSYNC_CONCURRENCY": "lots"},
     "WEIGHTSYNC_CONCURRENCY"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x", "--verify", "sometimes"], {}, "--verify"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x"], {"WEIGHTSYNC_OFFLINE": "maybe"}, "WEIGHTSYNC_OFFLINE"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x", "--lock-timeout", "-1"], {}, "--lock-timeout"),
    (["sync", "--source", "/tmp", "--dest", "/tmp/x", "--name", "../escape"], {}, "--name"),
    (["sync", "--source", "s3://b/p", "--dest", "/tmp/x", "--revision", "latest"], {}, "not an S3 revision"),
    (["sync", "--bogus"], {}, "unrecognized option"),
    (["run", "--source", "/tmp", "--dest", "/tmp/x"], {}, "needs the server command"),
    ([], {}, "a command is required"),
])
def test_bad_input_exits_2_with_one_error_line(args, env_extra, needle, clean_env):
    result = weightsync(*args, env={**clean_env, **env_extra})
    assert result.returncode == 2, result.stderr
    assert needle in error_line(result)


def test_missing_source_folder_exits_3(tmp_path, clean_env):
    result = weightsync("sync", "--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "v"), env=clean_env)
    assert result.returncode == 3
    assert "does not exist" in error_line(result)


def test_debug_shows_a_traceback_before_the_error_line(tmp_path, clean_env):
    result = weightsync("sync", "--debug", "--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "v"),
                        env=clean_env)
    assert result.returncode == 3
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("weightsync: error:")


def test_run_execs_the_command_in_the_same_process_with_model_dir(folder_model, tmp_path, clean_env):
    probe = ("import os, sys, json; print(json.dumps({'pid': os.getpid(), 'ppid': os.getppid(), "
             "'model_dir': os.environ['MODEL_DIR'], 'argv': sys.argv[1:]}))")
    import json
    import subprocess

    process = subprocess.Popen(
        [sys.executable, "-m", "weightsync", "run", "--source", str(folder_model), "--dest", str(tmp_path / "v"),
         "--", sys.executable, "-c", probe, "--model", "{MODEL_DIR}/config.json"],
        env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["pid"] == process.pid, "exec must replace weightsync, keeping its PID"
    assert report["ppid"] == os.getpid()
    assert Path(report["model_dir"]).is_dir()
    assert report["argv"] == ["--model", f"{report['model_dir']}/config.json"]
    assert "exec " in err


def test_run_exit_code_is_the_servers(folder_model, tmp_path, clean_env):
    result = weightsync("run", "--source", str(folder_model), "--dest", str(tmp_path / "v"), "--",
                        sys.executable, "-c", "raise SystemExit(17)", env=clean_env)
    assert result.returncode == 17


def test_run_with_an_unknown_command_exits_127_before_downloading_anything(folder_model, tmp_path, clean_env):
    result = weightsync("run", "--source", str(folder_model), "--dest", str(tmp_path / "v"), "--",
                        "no-such-server-binary", env=clean_env)
    assert result.returncode == 127, result.stderr
    assert "command not found" in error_line(result)
    assert not (tmp_path / "v").exists(), "the command is checked before the sync"


def test_run_with_a_command_that_is_not_executable_exits_126_before_downloading(folder_model, tmp_path,
                                                                               clean_env):
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    result = weightsync("run", "--source", str(folder_model), "--dest", str(tmp_path / "v"), "--", str(script),
                        env=clean_env)
    assert result.returncode == 126, result.stderr
    assert "not executable" in error_line(result)
    assert not (tmp_path / "v").exists()


def test_verify_passes_on_intact_and_names_each_bad_file(folder_model, tmp_path, clean_env):
    dest = str(tmp_path / "v")
    published = Path(weightsync("sync", "--source", str(folder_model), "--dest", dest, env=clean_env,
                                check=True).stdout.splitlines()[-1])
    ok = weightsync("verify", "--source", str(folder_model), "--dest", dest, env=clean_env)
    assert ok.returncode == 0, ok.stderr
    data = bytearray((published / "weights.bin").read_bytes())
    data[1000] ^= 0xFF
    (published / "weights.bin").write_bytes(bytes(data))
    (published / "sub" / "extra.txt").unlink()
    bad = weightsync("verify", "--source", str(folder_model), "--dest", dest, env=clean_env)
    assert bad.returncode == 4
    line = error_line(bad)
    assert "weights.bin: sha256 mismatch" in line and "sub/extra.txt: missing" in line


def test_verify_full_on_sync_repairs_a_damaged_revision(folder_model, tmp_path, clean_env):
    dest = str(tmp_path / "v")
    published = Path(weightsync("sync", "--source", str(folder_model), "--dest", dest, env=clean_env,
                                check=True).stdout.splitlines()[-1])
    (published / "config.json").write_text('{"a": 2}')
    fast = weightsync("sync", "--source", str(folder_model), "--dest", dest, env=clean_env)
    assert "warm start" in fast.stderr, "fast verification only checks sizes"
    full = weightsync("sync", "--verify", "full", "--source", str(folder_model), "--dest", dest, env=clean_env)
    assert full.returncode == 0, full.stderr
    assert "damaged" in full.stderr
    assert tree_bytes(published) == tree_bytes(folder_model)


def test_offline_uses_what_is_published_and_fails_clearly_otherwise(folder_model, tmp_path, clean_env):
    dest = str(tmp_path / "v")
    missing = weightsync("sync", "--offline", "--source", "s3://bucket/never-synced", "--dest", dest, env=clean_env)
    assert missing.returncode == 3
    assert "--offline" in error_line(missing)
    first = weightsync("sync", "--source", str(folder_model), "--dest", dest, env=clean_env, check=True)
    (folder_model / "config.json").write_text("changed")
    offline = weightsync("sync", "--offline", "--source", str(folder_model), "--dest", dest, env=clean_env)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


def test_every_option_has_a_typed_field_and_every_default_comes_from_the_transfer_config():
    from dataclasses import fields

    from weightsync.cli import ALL_OPTIONS
    from weightsync.commands import Options
    from weightsync.config import DEFAULTS, TransferConfig

    assert {o.dest for o in ALL_OPTIONS.values()} == {f.name for f in fields(Options)} - {"command"}
    tunable = {o.dest: o.default for o in ALL_OPTIONS.values() if o.dest in TransferConfig.names()}
    assert tunable and all(default == getattr(DEFAULTS, name) for name, default in tunable.items()), tunable


@pytest.mark.parametrize("bad", [{"concurrency": 0}, {"buffer_size": 0}, {"min_chunk_size": 1024},
                                 {"stall_timeout": 0.0}, {"retry_base": float("nan")}, {"retries": -1}])
def test_a_transfer_config_refuses_values_that_cannot_work(bad):
    from weightsync.config import TransferConfig

    with pytest.raises(ValueError, match="TransferConfig"):
        TransferConfig(**bad)



@pytest.mark.parametrize("columns", [None, "50", "0", "-3", "wide"])
def test_help_is_as_wide_as_argparse_would_make_it(columns, monkeypatch):
    import shutil

    from weightsync.cli import terminal_columns

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_columns() == shutil.get_terminal_size().columns
