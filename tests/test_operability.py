"""Operability: readable progress, JSON logs, termination message, metrics out of a short-lived process,
lockfiles, status, pre-exec checks and the native-sidecar serve mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, error_line, safetensors_bytes, tree_bytes, weightsync
from tests.support.s3server import free_port

MiB = 1024 * 1024


@pytest.fixture
def model(tmp_path: Path) -> Path:
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "tiny"}')
    (source / "model-00001-of-00002.safetensors").write_bytes(safetensors_bytes(os.urandom(2 * MiB)))
    (source / "model-00002-of-00002.safetensors").write_bytes(safetensors_bytes(os.urandom(MiB)))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return source


def json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.strip()]


def test_progress_lines_without_a_tty_are_readable_and_parse(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    from tests.support.helpers import upload_model

    upload_model(s3_server.client(), bucket, "p", {"w.bin": os.urandom(12 * MiB), "config.json": b"{}"})
    s3_proxy.faults.throttle_bps = 8 * MiB
    result = weightsync("sync", "--source", f"s3://{bucket}/p", "--dest", str(tmp_path), "--progress-interval",
                        "0.3", env=s3_env)
    assert result.returncode == 0, result.stderr
    pattern = re.compile(r"^weightsync: progress +(\d+\.\d)% ([\d.]+ \w+)/([\d.]+ \w+) at ([\d.]+ \w+)/s, "
                         r"ETA (\S+), files (\d+)/(\d+)$")
    lines = [m for m in map(pattern.match, result.stderr.splitlines()) if m]
    assert len(lines) >= 2, result.stderr
    percents = [float(m.group(1)) for m in lines]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents)
    assert lines[-1].group(7) == "2"
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"weightsync: published s3://{bucket}/p revision ")
    for needle in ("2 files", "fetched 12.0 MiB", "reused 0 B", "average",
                   # boto3's put_object adds a CRC32, cheaper than the MD5 ETag; the small config is not worth a HEAD
                   "verified: 1 file crc32 (source), 1 file md5 (source)"):
        assert needle in summary, summary
    assert "sha256-verified" not in result.stderr, "no source promised a sha256 here"


def test_json_logs_one_object_per_event_with_a_schema(model, tmp_path, clean_env):
    result = weightsync("sync", "--log-format", "json", "--source", str(model), "--dest", str(tmp_path / "v"),
                        env=clean_env)
    assert result.returncode == 0, result.stderr
    events = json_lines(result.stderr)
    for item in events:
        assert {"time", "level", "event", "message"} <= item.keys()
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", item["time"])
    kinds = [item["event"] for item in events]
    assert kinds[0] == "start" and kinds[-1] == "published"
    assert kinds.count("file_verified") == 4
    verified = [e for e in events if e["event"] == "file_verified"]
    assert {e["path"] for e in verified} == {p.name for p in model.iterdir()}
    assert all(len(e["sha256"]) == 64 and e["size"] > 0 for e in verified)
    published = events[-1]
    assert published["files"] == 4 and published["bytes_fetched"] == sum(p.stat().st_size for p in model.iterdir())
    failure = weightsync("sync", "--log-format", "json", "--source", str(tmp_path / "missing"), "--dest",
                         str(tmp_path / "v"), env=clean_env)
    assert failure.returncode == 3
    last = json_lines(failure.stderr)[-1]
    assert last["event"] == "error" and last["exit_code"] == 3 and last["message"].startswith("weightsync: error:")


def test_json_logs_report_retries(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    from tests.support.helpers import upload_model

    upload_model(s3_server.client(), bucket, "r", {"w.bin": os.urandom(6 * MiB)})
    s3_proxy.faults.drop_after, s3_proxy.faults.drop_times = 2 * MiB, 1
    result = weightsync("sync", "--log-format", "json", "--source", f"s3://{bucket}/r", "--dest", str(tmp_path),
                        env=s3_env)
    assert result.returncode == 0, result.stderr
    retries = [e for e in json_lines(result.stderr) if e["event"] == "retry"]
    assert retries and retries[0]["attempt"] == 1 and "reason" in retries[0]


def test_termination_message_on_success_and_failure(model, tmp_path, clean_env):
    message = tmp_path / "termination-log"
    ok = weightsync("sync", "--source", str(model), "--dest", str(tmp_path / "v"), "--termination-log",
                    str(message), env=clean_env)
    assert ok.returncode == 0
    body = json.loads(message.read_text())
    assert body["result"] == "success" and body["files"] == 4 and body["path"] == ok.stdout.splitlines()[-1]
    bad = weightsync("sync", "--source", str(tmp_path / "nope"), "--dest", str(tmp_path / "v"), "--termination-log",
                     str(message), env=clean_env)
    assert bad.returncode == 3
    body = json.loads(message.read_text())
    assert body == {"result": "error", "exit_code": 3, "error": error_line(bad)}


def test_metrics_textfile_parses_with_prometheus_client(model, tmp_path, clean_env):
    from prometheus_client.parser import text_string_to_metric_families

    textfile = tmp_path / "weightsync.prom"
    result = weightsync("sync", "--source", str(model), "--dest", str(tmp_path / "v"), "--name", "tiny",
                        "--metrics-textfile", str(textfile), env=clean_env)
    assert result.returncode == 0, result.stderr
    samples = {(s.name, s.labels.get("result", "")): s for family in
               text_string_to_metric_families(textfile.read_text()) for s in family.samples}
    size = sum(p.stat().st_size for p in model.iterdir())
    assert samples[("weightsync_download_bytes_total", "")].value == size
    assert samples[("weightsync_download_bytes_total", "")].labels == {"source_kind": "file", "model": "tiny"}
    assert samples[("weightsync_files_total", "")].value == 4
    assert samples[("weightsync_syncs_total", "success")].value == 1
    assert samples[("weightsync_sync_duration_seconds", "success")].value > 0
    assert abs(samples[("weightsync_last_success_timestamp_seconds", "")].value - time.time()) < 60
    assert ("weightsync_lock_wait_seconds", "") in samples and ("weightsync_retries_total", "") in samples
    assert not list(tmp_path.glob("*.prom.*")), "the textfile is written atomically (no temp left behind)"


class _PushReceiver:
    """A Pushgateway-compatible receiver: records each pushed body, parsed with prometheus_client."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                receiver.pushes.append((self.command, self.path, body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = _record

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_pushgateway_receives_metrics_on_success_and_on_failure(model, tmp_path, clean_env):
    from prometheus_client.parser import text_string_to_metric_families

    receiver = _PushReceiver()
    ok = weightsync("sync", "--source", str(model), "--dest", str(tmp_path / "v"), "--name", "tiny",
                    "--pushgateway", receiver.url, env=clean_env)
    assert ok.returncode == 0, ok.stderr
    bad = weightsync("sync", "--source", str(tmp_path / "missing"), "--dest", str(tmp_path / "v"), "--name", "tiny",
                     "--rebind", "--pushgateway", receiver.url, env=clean_env)
    assert bad.returncode == 3
    receiver.server.shutdown()
    assert [(method, path) for method, path, _ in receiver.pushes] == [
        ("PUT", "/metrics/job/weightsync/model/tiny")] * 2
    first = {s.name: s.value for f in text_string_to_metric_families(receiver.pushes[0][2]) for s in f.samples}
    second = {(s.name, s.labels.get("result")): s.value
              for f in text_string_to_metric_families(receiver.pushes[1][2]) for s in f.samples}
    assert first["weightsync_files_total"] == 4
    assert second[("weightsync_syncs_total", "error")] == 1


def test_lockfile_round_trip_offline_and_mismatch(model, tmp_path, clean_env):
    lock = weightsync("lock", "--source", str(model), env=clean_env)
    assert lock.returncode == 0, lock.stderr
    body = json.loads(lock.stdout)
    assert body["source"] == f"file://{model}" and len(body["files"]) == 4
    assert all(len(f["sha256"]) == 64 for f in body["files"])
    lockfile = tmp_path / "weightsync.lock"
    lockfile.write_text(lock.stdout)
    dest = str(tmp_path / "v")
    synced = weightsync("sync", "--lockfile", str(lockfile), "--dest", dest, env=clean_env)
    assert synced.returncode == 0, synced.stderr
    assert tree_bytes(Path(synced.stdout.splitlines()[-1])) == tree_bytes(model)
    offline = weightsync("sync", "--offline", "--lockfile", str(lockfile), "--dest", dest, env=clean_env)
    assert offline.returncode == 0 and offline.stdout == synced.stdout
    (model / "config.json").write_text('{"model_type": "changed"}')
    changed = weightsync("sync", "--lockfile", str(lockfile), "--dest", str(tmp_path / "fresh"), env=clean_env)
    assert changed.returncode == 4
    assert "no longer matches --lockfile" in error_line(changed)
    other = weightsync("sync", "--lockfile", str(lockfile), "--source", "s3://other/x", "--dest", dest, env=clean_env)
    assert other.returncode == 2


def test_status_shows_models_revisions_current_and_staging(model, tmp_path, clean_env):
    dest = tmp_path / "v"
    first = weightsync("sync", "--source", str(model), "--dest", str(dest), "--name", "tiny", env=clean_env)
    (model / "config.json").write_text('{"v": 2}')
    second = weightsync("sync", "--source", str(model), "--dest", str(dest), "--name", "tiny", env=clean_env)
    (dest / "tiny" / ".staging" / "abandoned").mkdir(parents=True)
    report = weightsync("status", "--dest", str(dest), "--json", env=clean_env)
    assert report.returncode == 0, report.stderr
    body = json.loads(report.stdout)
    [tiny] = body["models"]
    current = Path(second.stdout.splitlines()[-1]).name
    assert tiny["current"] == current
    assert {r["revision"] for r in tiny["revisions"]} == {current, Path(first.stdout.splitlines()[-1]).name}
    assert all(r["files"] == 4 and r["last_verified"] for r in tiny["revisions"])
    assert [s["revision"] for s in tiny["staging"]] == ["abandoned"]
    table = weightsync("status", "--dest", str(dest), env=clean_env).stdout
    assert f"* {current}" in table and "staging abandoned" in table


def test_run_refuses_a_model_with_a_missing_or_truncated_shard(model, tmp_path, clean_env):
    truncated = model / "model-00002-of-00002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    result = weightsync("run", "--source", str(model), "--dest", str(tmp_path / "v"), "--", "true", env=clean_env)
    assert result.returncode == 4
    assert "model-00002-of-00002.safetensors: tensor weights ends at byte" in error_line(result)
    truncated.unlink()
    missing = weightsync("run", "--source", str(model), "--dest", str(tmp_path / "v"), "--", "true", env=clean_env)
    assert missing.returncode == 4
    assert "shard model-00002-of-00002.safetensors is missing" in error_line(missing)
    skipped = weightsync("run", "--skip-checks", "--source", str(model), "--dest", str(tmp_path / "v"), "--", "true",
                         env=clean_env)
    assert skipped.returncode == 0, skipped.stderr


@pytest.mark.skipif(any(Path("/dev").glob("nvidia[0-9]*")), reason="this machine has a GPU")
def test_require_gpu_fails_fast_on_a_gpu_less_machine(model, tmp_path, clean_env):
    result = weightsync("run", "--require-gpu", "--source", str(model), "--dest", str(tmp_path / "v"), "--", "true",
                        env={**clean_env, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "no CUDA device is visible" in error_line(result)
    assert not (tmp_path / "v").exists(), "it fails before downloading anything"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_serve_reports_ready_serves_metrics_and_picks_up_a_new_revision(model, tmp_path, clean_env):
    port = free_port()
    ready_file = tmp_path / "ready"
    dest = tmp_path / "v"
    process = subprocess.Popen(
        [sys.executable, "-m", "weightsync", "serve", "--source", str(model), "--dest", str(dest), "--name", "tiny",
         "--metrics-port", str(port), "--ready-file", str(ready_file), "--recheck-interval", "0.5"],
        env=clean_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while _get(f"http://127.0.0.1:{port}/readyz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
        first = os.readlink(dest / "tiny" / "current")
        assert ready_file.read_text().strip() == str(dest / "tiny" / first)
        status, metrics = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'weightsync_ready{model="tiny",source_kind="file"} 1.0' in metrics
        (model / "config.json").write_text('{"model_type": "tiny", "v": 2}')
        while os.readlink(dest / "tiny" / "current") == first and time.monotonic() < deadline:
            time.sleep(0.1)
        second = os.readlink(dest / "tiny" / "current")
        assert second != first and (dest / "tiny" / first).is_dir(), "the old revision stays for running servers"
        assert (dest / "tiny" / second / "config.json").read_text().endswith('"v": 2}')
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "new revision" in err


def test_on_a_tty_progress_is_a_tqdm_bar_with_one_bar_per_large_file(tmp_path, clean_env):
    import pty

    source = tmp_path / "big"
    source.mkdir()
    with open(source / "large.bin", "wb") as handle:
        handle.truncate(300 * MiB)
    (source / "config.json").write_text("{}")
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "weightsync", "sync", "--source", str(source), "--dest",
                                str(tmp_path / "v")], stdout=subprocess.PIPE, stderr=follower, env=clean_env,
                               cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=120)
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, screen
    assert "weightsync:" in screen and "300M" in screen, screen[-2000:]
    assert "large.bin" in screen, "a file of 256 MiB or more gets a bar of its own"
    assert "progress " not in screen, "no plain progress lines on a TTY"
