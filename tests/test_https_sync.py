"""The https:// source against a real TLS web server on loopback (tests/support/httpserver.py) behind a private CA:
verified by what the user pinned or the server sent, resumable, safe with many pods, honest about size-only
files, and never showing a token or a presigned query."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.helpers import (
    error_line,
    heavy_modules_loaded,
    safetensors_bytes,
    tree_bytes,
    weightsync,
    weightsync_popen,
)
from tests.support.httpserver import HttpServer, private_ca, write_lockfile
from tests.support.nginx import REQUIRE_ENV as NGINX_REQUIRED
from tests.support.nginx import Nginx, Unavailable
from tests.support.proxy import CountingProxy

MiB = 1024 * 1024
BASE = "/models/tiny/"
BIG = "model.safetensors"
TOKEN = "wsHttpToken" + os.urandom(12).hex()
TOKEN_ENV = "WEIGHTSYNC_HTTP_TOKEN"
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "AWS_CA_BUNDLE")


def model(seed: int = 0, big: int = 3 * MiB) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"config.json": b'{"model_type": "tiny", "seed": %d}' % seed, "sub/tokenizer.json": b'{"vocab": []}',
            "empty.txt": b"", BIG: safetensors_bytes(rng.randbytes(big))}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, object]:
    return private_ca(tmp_path / "tls")


@pytest.fixture
def env(clean_env: dict[str, str], tls: tuple[Path, object]) -> dict[str, str]:
    """A weightsync process that trusts the test CA through SSL_CERT_FILE, and nothing else of this machine's
    CA settings (this machine sets REQUESTS_CA_BUNDLE and SSL_CERT_FILE for everything)."""
    kept = {k: v for k, v in clean_env.items() if k not in CA_VARIABLES and "proxy" not in k.lower()}
    return {**kept, "SSL_CERT_FILE": str(tls[0]), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def server(tls: tuple[Path, object]) -> Iterator[HttpServer]:
    with HttpServer(tls=tls[1]) as running:
        yield running


def publish(server: HttpServer, files: dict[str, bytes], base: str = BASE) -> None:
    for name, data in files.items():
        server.put(base + name, data)


def published_dir(result) -> Path:
    return Path(result.stdout.splitlines()[-1])


def nothing_published(dest: Path) -> bool:
    return not list(dest.glob("*/current")) and not list(dest.glob("*/revisions/*"))


# ----------------------------------------------------------------------------------------------- cold syncs


def test_one_file_pinned_by_the_url_fragment_is_byte_identical_and_reported_as_verified_by_it(server, env, tmp_path):
    files = model(1)
    publish(server, files)
    url = f"{server.url}{BASE}{BIG}#sha256={sha256(files[BIG])}"
    result = weightsync("sync", "--source", url, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == {BIG: files[BIG]}
    assert "verified: 1 file sha256 (url fragment)" in result.stderr


def test_a_lockfile_set_under_a_base_url_is_byte_identical_and_verified_by_the_lockfile(server, env, tmp_path):
    files = model(2)
    publish(server, files)
    lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
    for args in (["--source", server.url + BASE, "--lockfile", str(lock)], ["--lockfile", str(lock)]):
        result = weightsync("sync", *args, "--dest", str(tmp_path / "v"), "--log-format", "json", env=env)
        assert result.returncode == 0, result.stderr
        assert tree_bytes(published_dir(result)) == files
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [done] = [e for e in events if e["event"] == "published"]
    assert done["warm"] is True, "the second run is a warm start"
    assert done["evidence"] == {"sha256 (lockfile)": len(files)}


@pytest.mark.parametrize(("header", "field"), [("repr", "Repr-Digest"), ("digest", "Digest")])
def test_a_repr_digest_or_digest_header_verifies_a_file_nobody_pinned(tls, env, tmp_path, header, field):
    files = model(3)
    with HttpServer(tls=tls[1], digest=header) as server:
        publish(server, files)
        result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"),
                            "--require-checksum", "--log-format", "json", env=env)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [verified] = [e for e in events if e["event"] == "file_verified"]
    assert verified["evidence"] == "sha256 (source)"
    manifest = json.loads(next((tmp_path / "v").glob("*/manifests/*.json")).read_text())
    assert manifest["files"][0]["verified"]["promise"]["field"] == field


def test_without_any_checksum_a_file_is_reported_size_only_and_require_checksum_refuses_it(server, env, tmp_path):
    files = model(4)
    publish(server, files)
    url = server.url + BASE + BIG
    refused = weightsync("sync", "--source", url, "--dest", str(tmp_path / "strict"), "--require-checksum", env=env)
    assert refused.returncode == 4, refused.stderr
    assert "--require-checksum" in error_line(refused) and BIG in error_line(refused)
    assert nothing_published(tmp_path / "strict")
    result = weightsync("sync", "--source", url, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 0, result.stderr
    assert "verified: 1 file size only: the source promised nothing" in result.stderr


def test_a_base_url_without_a_lockfile_is_a_usage_error_that_says_to_give_one(server, env, tmp_path):
    result = weightsync("sync", "--source", server.url + BASE, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 2
    assert "--lockfile" in error_line(result) and "weightsync lock" in error_line(result)
    assert result.stderr.count("\n") == 1 and server.requests == [], "refused before any request or log line"


def test_verify_and_status_of_a_lockfile_set_need_no_lockfile(server, env, tmp_path):
    files = model(23)
    publish(server, files)
    lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
    synced = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    assert synced.returncode == 0, synced.stderr
    server.reset_log()
    for args in (["verify"], ["verify", "--revision", published_dir(synced).name],
                 ["verify", "--source", server.url + BASE], ["status"]):
        result = weightsync(*args, "--dest", str(tmp_path / "v"), env=env)
        assert result.returncode == 0, (args, result.stderr)
    assert server.requests == []
    (published_dir(synced) / "config.json").chmod(0o644)
    (published_dir(synced) / "config.json").write_bytes(b"{}")
    damaged = weightsync("verify", "--dest", str(tmp_path / "v"), env=env)
    assert damaged.returncode == 4 and "config.json" in error_line(damaged) and "--lockfile" in error_line(damaged)
    repaired = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), "--verify", "full", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert tree_bytes(published_dir(repaired)) == files


def test_lock_a_base_url_to_the_files_of_a_local_copy_then_sync_from_that_lockfile(server, env, tmp_path):
    files = model(5)
    publish(server, files)
    folder = tmp_path / "local"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    local = weightsync("lock", "--source", str(folder), env=env)
    assert local.returncode == 0, local.stderr
    (tmp_path / "local.lock").write_text(local.stdout)
    mixed = weightsync("sync", "--source", f"{server.url}{BASE}?sig=wsquerysecret9", "--lockfile",
                       str(tmp_path / "local.lock"), "--dest", str(tmp_path / "v"), env=env)
    assert mixed.returncode == 2 and "weightsync lock --source" in error_line(mixed)
    assert "wsquerysecret9" not in mixed.stderr
    relocked = weightsync("lock", "--source", server.url + BASE, "--lockfile", str(tmp_path / "local.lock"), env=env)
    assert relocked.returncode == 0, relocked.stderr
    body = json.loads(relocked.stdout)
    assert body["source"] == server.url + BASE
    assert {f["path"]: f["sha256"] for f in body["files"]} == {name: sha256(data) for name, data in files.items()}
    (tmp_path / "https.lock").write_text(relocked.stdout)
    synced = weightsync("sync", "--lockfile", str(tmp_path / "https.lock"), "--dest", str(tmp_path / "v"), env=env)
    assert synced.returncode == 0, synced.stderr
    assert published_dir(synced).name == body["revision"], "the lockfile's revision is the one it publishes"
    assert tree_bytes(published_dir(synced)) == files


def test_lock_refuses_a_mirror_whose_bytes_differ_from_the_local_copy(server, env, tmp_path):
    files = model(6)
    publish(server, {**files, "config.json": b'{"other": 1}'})
    write_lockfile(tmp_path / "local.lock", "/somewhere/local", files)
    relocked = weightsync("lock", "--source", server.url + BASE, "--lockfile", str(tmp_path / "local.lock"), env=env)
    assert relocked.returncode == 4, relocked.stderr
    assert "config.json" in error_line(relocked) and relocked.stdout == ""


# ----------------------------------------------------------------------------------------------- warm starts


def test_a_warm_start_pinned_by_fragment_or_lockfile_makes_zero_requests(server, env, tmp_path):
    files = model(7)
    publish(server, files)
    proxy = CountingProxy("127.0.0.1", server.port)
    try:
        base = f"https://127.0.0.1:{proxy.port}{BASE}"
        lock = write_lockfile(tmp_path / "tiny.lock", base, files)
        one = f"{base}{BIG}#sha256={sha256(files[BIG])}"
        for args in (["--lockfile", str(lock)], ["--source", one]):
            assert weightsync("sync", *args, "--dest", str(tmp_path / "v"), env=env).returncode == 0
            server.reset_log()
            proxy.stats.reset()
            again = weightsync("run", *args, "--dest", str(tmp_path / "v"), "--", "true", env=env)
            assert again.returncode == 0, again.stderr
            assert server.requests == [] and proxy.stats.connections == 0
    finally:
        proxy.close()


def test_a_pinned_warm_start_from_https_imports_no_heavy_module(server, env, tmp_path):
    files = model(8)
    publish(server, files)
    args = ["sync", "--source", f"{server.url}{BASE}{BIG}#sha256={sha256(files[BIG])}", "--dest", str(tmp_path)]
    assert weightsync(*args, env=env).returncode == 0
    code, heavy = heavy_modules_loaded(*args, env=env)
    assert code == 0 and heavy == []


# ----------------------------------------------------------------------------------------------- resume, many pods


@pytest.mark.slow
def test_sigkill_mid_download_then_resume_fetches_only_the_missing_bytes(server, env, tmp_path):
    files = {BIG: os.urandom(24 * MiB), "config.json": b"{}"}
    total = sum(map(len, files.values()))
    publish(server, files)
    lock = write_lockfile(tmp_path / "big.lock", server.url + BASE, files)
    server.faults.throttle_bps = 6 * MiB
    process = weightsync_popen("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    deadline = time.monotonic() + 60
    while server.bytes_sent < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = server.bytes_sent
    assert nothing_published(tmp_path / "v")
    server.faults.throttle_bps = None
    server.reset_log()
    resumed = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(published_dir(resumed)) == files
    second = server.bytes_sent
    assert second < (total - first) + 0.05 * total, (total, first, second)
    [get] = [r for r in server.requests if r.method == "GET" and BIG in r.path]
    assert not get.headers["range"].startswith("bytes=0-") and get.headers["if-range"] == server.etag(BASE + BIG)


@pytest.mark.slow
def test_four_processes_on_one_empty_volume_download_the_bytes_once(server, env, tmp_path):
    files = model(9, big=8 * MiB)
    publish(server, files)
    lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
    server.faults.throttle_bps = 16 * MiB
    processes = [weightsync_popen("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
                 for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, [err for _, err in outputs]
    assert len({out.splitlines()[-1] for out, _ in outputs}) == 1
    assert server.bytes_sent <= 1.05 * sum(map(len, files.values()))


# ----------------------------------------------------------------------------------------------- errors


def test_a_bad_or_missing_token_and_a_missing_file_exit_3_with_a_clear_line_and_no_secret(tls, env, tmp_path):
    files = model(10)
    with HttpServer(tls=tls[1], token=TOKEN) as server:
        publish(server, files)
        url = server.url + BASE + BIG
        cases = [
            (url, {TOKEN_ENV: "wrong" + TOKEN}, "access denied (HTTP 401); check WEIGHTSYNC_HTTP_TOKEN"),
            (url, {}, "access denied (HTTP 401); set WEIGHTSYNC_HTTP_TOKEN"),
            (server.url + BASE + "missing.bin", {TOKEN_ENV: TOKEN}, "not found (HTTP 404)"),
        ]
        for source, extra, needle in cases:
            result = weightsync("sync", "--source", source, "--dest", str(tmp_path / "v"), env={**env, **extra})
            assert result.returncode == 3, result.stderr
            assert needle in error_line(result), result.stderr
            debug = weightsync("sync", "--debug", "--source", source, "--dest", str(tmp_path / "v"),
                               env={**env, **extra})
            assert debug.returncode == 3 and "Traceback" in debug.stderr
            assert TOKEN not in result.stdout + result.stderr + debug.stdout + debug.stderr
        good = weightsync("sync", "--debug", "--source", url, "--dest", str(tmp_path / "v"),
                          env={**env, TOKEN_ENV: TOKEN})
    assert good.returncode == 0, good.stderr
    assert TOKEN not in good.stdout + good.stderr
    assert all(r.authenticated for r in server.requests[-2:])


@pytest.mark.parametrize("pin", ["fragment", "lockfile", "repr-digest"])
def test_bytes_that_disagree_with_the_pin_exit_4_and_nothing_is_published(tls, env, tmp_path, pin):
    files = model(11)
    with HttpServer(tls=tls[1], digest="repr" if pin == "repr-digest" else None) as server:
        publish(server, files)
        server.faults.corrupt = {BASE + BIG}
        if pin == "lockfile":
            lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
            args = ["--lockfile", str(lock)]
        else:
            fragment = f"#sha256={sha256(files[BIG])}" if pin == "fragment" else ""
            args = ["--source", server.url + BASE + BIG + fragment]
        result = weightsync("sync", *args, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 4, result.stderr
    assert f"checksum mismatch for {BIG}" in error_line(result)
    assert nothing_published(tmp_path / "v")


def test_a_fragment_the_servers_repr_digest_contradicts_is_refused_before_downloading(tls, env, tmp_path):
    files = model(12)
    with HttpServer(tls=tls[1], digest="repr") as server:
        publish(server, files)
        url = f"{server.url}{BASE}{BIG}#sha256={sha256(b'another file')}"
        result = weightsync("sync", "--source", url, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 4, result.stderr
    assert "Repr-Digest sha256 differs" in error_line(result)
    assert not [r for r in server.requests if r.method == "GET"], "nothing was downloaded"


def test_a_file_changed_between_two_ranged_reads_is_exit_4_and_never_spliced(server, env, tmp_path):
    files = model(13, big=4 * MiB)
    publish(server, files)
    changed = bytes(b ^ 0x5A for b in files[BIG])  # same size: only the ETag and Last-Modified tell
    server.faults.change_after = {BASE + BIG: (1 * MiB, changed)}  # drop the connection there, then replace it
    result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"),
                        "--retry-base", "0.01", env=env)
    assert result.returncode == 4, result.stderr
    assert "changed" in error_line(result)
    assert nothing_published(tmp_path / "v")
    gets = [r for r in server.requests if r.method == "GET"]
    assert len(gets) == 2 and gets[1].headers["range"].startswith(f"bytes={MiB}-") and gets[1].status == 200


def test_a_server_that_ignores_range_serves_whole_files_but_a_resume_is_exit_4(server, env, tmp_path):
    files = model(24, big=4 * MiB)
    publish(server, files)
    server.faults.ignore_range = True
    whole = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"), env=env)
    assert whole.returncode == 0, whole.stderr
    assert tree_bytes(published_dir(whole)) == {BIG: files[BIG]}
    server.faults.change_after = {BASE + BIG: (1 * MiB, files[BIG])}  # a dropped connection, the same content
    resumed = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "w"),
                         "--retry-base", "0.01", env=env)
    assert resumed.returncode == 4, resumed.stderr
    assert "ignored the byte range" in error_line(resumed)
    assert nothing_published(tmp_path / "w")


def test_a_stalled_server_ends_in_exit_7_with_a_short_stall_timeout(server, env, tmp_path):
    files = model(14)
    publish(server, files)
    server.faults.stall = {BASE + BIG}
    started = time.monotonic()
    result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"),
                        "--stall-timeout", "1", "--retries", "2", "--retry-base", "0.05", env=env)
    assert result.returncode == 7, result.stderr
    assert time.monotonic() - started < 30
    assert nothing_published(tmp_path / "v")


# ----------------------------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_a_private_ca_is_trusted_through_ssl_cert_file_or_requests_ca_bundle(server, env, tls, tmp_path, variable):
    files = model(15)
    publish(server, files)
    trusting = {**{k: v for k, v in env.items() if k != "SSL_CERT_FILE"}, variable: str(tls[0])}
    result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"), env=trusting)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == {BIG: files[BIG]}


def test_requests_ca_bundle_adds_to_the_system_cas_instead_of_hiding_ssl_cert_file(server, env, tls, tmp_path):
    publish(server, model(16))
    other_ca, _ = private_ca(tmp_path / "other")
    both = {**env, "REQUESTS_CA_BUNDLE": str(other_ca)}  # a platform-wide bundle that lacks the test CA
    result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"), env=both)
    assert result.returncode == 0, result.stderr


def test_an_untrusted_certificate_is_exit_3_with_a_line_naming_the_variables(server, env, tmp_path):
    publish(server, model(17))
    untrusting = {k: v for k, v in env.items() if k != "SSL_CERT_FILE"}
    result = weightsync("sync", "--source", server.url + BASE + BIG, "--dest", str(tmp_path / "v"), env=untrusting)
    assert result.returncode == 3, result.stderr
    line = error_line(result)
    assert "TLS certificate is not trusted" in line and "SSL_CERT_FILE" in line and "REQUESTS_CA_BUNDLE" in line


def test_https_to_a_plain_http_port_is_exit_3_saying_so(env, tmp_path):
    with HttpServer() as plain:
        plain.put(BASE + BIG, b"x")
        url = plain.url.replace("http://", "https://") + BASE + BIG
        result = weightsync("sync", "--source", url, "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 3, result.stderr
    assert "does not speak TLS" in error_line(result) and "http://" in error_line(result)


# ----------------------------------------------------------------------------------------------- token, redirects


def test_the_token_goes_to_the_origin_but_never_to_a_redirect_target_on_another_host(tls, env, tmp_path):
    files = model(18)
    with HttpServer(tls=tls[1], host="localhost") as cdn, \
            HttpServer(tls=tls[1], token=TOKEN, redirect_to=cdn, redirect_query="X-Amz-Signature=cdnsig") as origin:
        publish(cdn, files)
        lock = write_lockfile(tmp_path / "tiny.lock", origin.url + BASE, files)
        result = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"),
                            env={**env, TOKEN_ENV: TOKEN})
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == files
    assert origin.requests and all(r.authenticated for r in origin.requests)
    assert cdn.requests and not any(r.authenticated for r in cdn.requests), "the token must not reach the CDN"
    assert all("X-Amz-Signature=cdnsig" in r.path for r in cdn.requests)


PRESIGNED = ("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAWSQUERYSECRET1%2F20260101&"
             "X-Amz-Signature=wsquerysecret2deadbeef&X-Goog-Signature=wsquerysecret3&sig=wsquerysecret4&"
             "token=wsquerysecret5&se=2030-01-01")
QUERY_SECRETS = ("AKIAWSQUERYSECRET1", "wsquerysecret2deadbeef", "wsquerysecret3", "wsquerysecret4",
                 "wsquerysecret5", "2030-01-01")


def test_a_presigned_query_never_reaches_any_output_metrics_or_the_volume(server, env, tmp_path):
    files = model(19)
    publish(server, files)
    dest = tmp_path / "v"
    outputs = []
    for source, code in ((f"{server.url}{BASE}{BIG}?{PRESIGNED}", 0), (f"{server.url}{BASE}gone.bin?{PRESIGNED}", 3)):
        for log_format in ("text", "json"):
            metrics, termination = tmp_path / f"metrics-{code}.prom", tmp_path / f"termination-{code}"
            result = weightsync("sync", "--debug", "--log-format", log_format, "--source", source, "--dest",
                                str(dest), "--metrics-textfile", str(metrics), "--termination-log",
                                str(termination), env=env)
            assert result.returncode == code, result.stderr
            outputs += [result.stdout, result.stderr, *(p.read_text() for p in (metrics, termination) if p.exists())]
    server.faults.corrupt = {BASE + BIG}
    corrupt = weightsync("sync", "--source", f"{server.url}{BASE}{BIG}?{PRESIGNED}#sha256={'0' * 64}", "--dest",
                         str(tmp_path / "v2"), env=env)
    assert corrupt.returncode == 4, corrupt.stderr
    status = weightsync("status", "--dest", str(dest), "--json", env=env)
    outputs += [corrupt.stdout, corrupt.stderr, status.stdout, status.stderr]
    assert any("X-Amz-Signature" in r.path for r in server.requests), "the query is sent to the server"
    volume = [str(p) for p in dest.rglob("*")] + [p.read_text(errors="replace") for p in dest.rglob("*")
                                                  if p.is_file() and p.stat().st_size < 1_000_000]
    text = "\n".join(outputs + volume)
    assert [secret for secret in QUERY_SECRETS if secret in text] == []
    manifest = json.loads(next(dest.glob("*/manifests/*.json")).read_text())
    assert manifest["source"] == f"{server.url}{BASE}{BIG}"


def test_a_server_that_refuses_head_like_a_url_presigned_for_get_is_probed_with_a_one_byte_get(server, env,
                                                                                             tmp_path):
    files = model(22)
    publish(server, files)
    server.faults.head_status = 403
    lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
    result = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == files, "the empty file's size comes from a 416's Content-Range"
    probes = [r for r in server.requests if r.method == "GET" and r.headers.get("range") == "bytes=0-0"]
    assert len(probes) == len(files)


# ----------------------------------------------------------------------------------------------- plain http


def test_plain_http_on_loopback_works_for_in_cluster_mirrors(env, tmp_path):
    files = model(20)
    with HttpServer() as server:
        publish(server, files)
        lock = write_lockfile(tmp_path / "tiny.lock", server.url + BASE, files)
        result = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == files


# ----------------------------------------------------------------------------------------------- nginx


@pytest.fixture
def nginx(tls, tmp_path: Path) -> Iterator[Nginx]:
    """nginx (a real static web server) serving tmp_path/www over TLS, 8 MiB/s per connection; a skip where it is
    not installed, a failure under WS_REQUIRE_NGINX=1."""
    server = Nginx(tmp_path / "www", tmp_path / "nginx", tls[0].parent, limit_rate="8m")
    try:
        server.start()
    except Unavailable as exc:
        if os.environ.get(NGINX_REQUIRED):
            pytest.fail(f"{exc}, and {NGINX_REQUIRED} is set")
        pytest.skip(str(exc))
    yield server
    server.stop()


def test_nginx_serves_a_lockfile_set_byte_identical_through_heads_and_ranged_gets(nginx, env, tmp_path):
    files = model(21)
    for name, data in files.items():
        (nginx.root / "models/tiny" / name).parent.mkdir(parents=True, exist_ok=True)
        (nginx.root / "models/tiny" / name).write_bytes(data)
    lock = write_lockfile(tmp_path / "tiny.lock", nginx.url + BASE, files)
    result = weightsync("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "v"), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(published_dir(result)) == files
    assert "4 files sha256 (lockfile)" in result.stderr
    gets = [r for r in nginx.requests() if r["method"] == "GET"]
    assert gets and all(r["status"] == "206" and r["if_range"].startswith('"') for r in gets), gets


@pytest.mark.slow
def test_nginx_resume_is_pinned_by_if_range_and_a_file_rewritten_meanwhile_is_fetched_whole(nginx, env, tmp_path):
    path = nginx.root / "models" / BIG
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(24 * MiB))
    url, dest = f"{nginx.url}/models/{BIG}", str(tmp_path / "v")
    process = weightsync_popen("sync", "--source", url, "--dest", dest, env=env)
    time.sleep(1.5)  # 8 MiB/s: about half of it
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = weightsync("sync", "--source", url, "--dest", dest, env=env)  # unchanged: resumed, not restarted
    assert resumed.returncode == 0, resumed.stderr
    assert tree_bytes(published_dir(resumed)) == {BIG: path.read_bytes()}
    [first, second] = [r for r in nginx.requests() if r["method"] == "GET"]
    assert second["range"] != f"bytes=0-{24 * MiB - 1}" and second["status"] == "206", (first, second)
    assert second["if_range"].startswith('"'), "pinned to nginx's strong ETag"
    process = weightsync_popen("sync", "--source", url, "--dest", str(tmp_path / "w"), env=env)
    time.sleep(1.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    path.write_bytes(os.urandom(24 * MiB))  # same size, a new mtime: a new ETag, a size-only check would not tell
    os.utime(path, (time.time() + 5, time.time() + 5))
    nginx.access_log.write_text("")
    changed = weightsync("sync", "--source", url, "--dest", str(tmp_path / "w"), env=env)
    assert changed.returncode == 0, changed.stderr
    assert published_dir(changed).name != published_dir(resumed).name, "a new ETag is a new revision"
    assert tree_bytes(published_dir(changed)) == {BIG: path.read_bytes()}, "downloaded whole, never spliced"
    [get] = [r for r in nginx.requests() if r["method"] == "GET"]
    assert get["range"].startswith("bytes=0-")
