"""Crash-anywhere: SIGKILL a sync at random moments and at every publish step; nothing partial is ever exposed.

After every kill, `current` and every directory under revisions/ (what a later run
would hand out as MODEL_DIR) must be absent or byte-identical to the source. Kills
land on one volume in a row (each run resumes the previous one's staging); after
each round a clean rerun must succeed and `weightsync verify` must pass.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.adversarial.harness import MiB, Proc, exposure, last_path, model, ws
from tests.support.helpers import tree_bytes, upload_model
from tests.support.proxy import CountingProxy

RANDOM_KILLS_PER_SOURCE = 16
PAUSE_POINTS = ("locked", "before-publish", "manifest-written", "renamed")
TOTALS = {"kills": 0, "exposed": 0, "finished_before_kill": 0}


def _round(start, name_dir: Path, expected: dict[str, bytes], rng: random.Random, kills: int, max_delay: float,
           workdir: Path) -> list[str]:
    """`kills` SIGKILLs at random moments on one volume; return every exposure seen."""
    problems = []
    done = 0
    while done < kills:
        process: Proc = start(workdir)
        time.sleep(rng.uniform(0.05, max_delay))
        if process.kill():
            done += 1
            TOTALS["kills"] += 1
        else:
            TOTALS["finished_before_kill"] += 1
        seen = exposure(name_dir, expected)
        TOTALS["exposed"] += bool(seen)
        problems += [f"kill #{TOTALS['kills']} after {time.monotonic() - process.started:.2f}s: {p}" for p in seen]
        if (name_dir / "current").exists():
            break  # published: later runs would only be warm starts; the caller starts a new volume
    return problems


def _crash_campaign(kind: str, source: str, env: dict[str, str], files: dict[str, bytes], tmp_path: Path,
                    set_throttle, seed: int, model_args: list[str] | None = None) -> None:
    """`model_args` name the model for a sync (default `--source SOURCE`; an https:// set: `--lockfile FILE`)."""
    rng = random.Random(seed)
    what = model_args or ["--source", source]
    problems: list[str] = []
    volume_index = 0
    killed = 0

    def fresh_volume() -> tuple[Path, Path]:
        nonlocal volume_index
        volume_index += 1
        dest = tmp_path / f"vol{volume_index}"
        return dest, dest / "m"

    def check_clean_rerun(dest: Path, name_dir: Path) -> None:
        set_throttle(False)
        again = ws("sync", *what, "--dest", str(dest), "--name", "m", env=env)
        assert again.returncode == 0, again.stderr
        assert tree_bytes(last_path(again)) == files
        verify = ws("verify", "--source", source, "--dest", str(dest), "--name", "m", env=env)
        assert verify.returncode == 0, verify.stderr
        assert exposure(name_dir, files) == []
        set_throttle(True)

    # Random moments: startup, listing, lock, mid-chunk, between files, verification, publish.
    set_throttle(True)
    started = time.monotonic()
    calibration = ws("sync", *what, "--dest", str(tmp_path / "calibration"), "--name", "m", env=env)
    assert calibration.returncode == 0, calibration.stderr
    full_run = time.monotonic() - started
    while killed < RANDOM_KILLS_PER_SOURCE:
        dest, name_dir = fresh_volume()
        before = TOTALS["kills"]
        problems += _round(lambda w, d=dest: Proc("sync", *what, "--dest", str(d), "--name", "m",
                                                    env=env, workdir=w),
                           name_dir, files, rng, min(5, RANDOM_KILLS_PER_SOURCE - killed), full_run * 1.1,
                           tmp_path / "logs")
        killed += TOTALS["kills"] - before
        check_clean_rerun(dest, name_dir)

    # Exact moments: holding the lock, every file verified but nothing published, manifest written, renamed.
    for point in PAUSE_POINTS:
        dest, name_dir = fresh_volume()
        process = Proc("sync", *what, "--dest", str(dest), "--name", "m",
                       env={**env, "WEIGHTSYNC_TEST_PAUSE_AT": point}, workdir=tmp_path / "logs")
        assert process.wait_for(f"paused at {point}"), process.stderr
        assert process.kill()
        TOTALS["kills"] += 1
        seen = exposure(name_dir, files)
        TOTALS["exposed"] += bool(seen)
        problems += [f"kill at {point}: {p}" for p in seen]
        if point == "renamed":  # complete revision, `current` not flipped yet: the next run flips it
            assert not (name_dir / "current").exists()
        check_clean_rerun(dest, name_dir)
    print(f"\n{kind}: crash campaign so far: {TOTALS['kills']} SIGKILLs "
          f"({TOTALS['finished_before_kill']} runs finished before their kill), "
          f"{TOTALS['exposed']} kills exposed a partial model")
    assert problems == [], "\n".join(problems)


@pytest.mark.slow
def test_sigkill_anywhere_s3_never_exposes_a_partial_model(s3_server, bucket, s3_env, s3_proxy, tmp_path):
    files = model(11)
    upload_model(s3_server.client(), bucket, "crash", files)

    def throttle(on: bool) -> None:
        s3_proxy.faults.throttle_bps = 3 * MiB if on else None

    _crash_campaign("s3", f"s3://{bucket}/crash", s3_env, files, tmp_path, throttle, seed=5)


@pytest.mark.slow
def test_sigkill_anywhere_hf_never_exposes_a_partial_model(hub, hub_env, tmp_path):
    files = model(12)
    hub.add_commit("acme/crash", files)

    def throttle(on: bool) -> None:
        hub.faults.throttle_bps = 3 * MiB if on else None

    _crash_campaign("hf", "hf://acme/crash", hub_env, files, tmp_path, throttle, seed=6)


@pytest.mark.slow
def test_sigkill_anywhere_gs_never_exposes_a_partial_model(gcs_server, gcs_bucket, gcs_env, gcs_proxy, tmp_path):
    files = model(13)
    for name, data in files.items():
        gcs_server.upload(gcs_bucket, f"crash/{name}", data)

    def throttle(on: bool) -> None:
        gcs_proxy.faults.throttle_bps = 3 * MiB if on else None

    _crash_campaign("gs", f"gs://{gcs_bucket}/crash", gcs_env, files, tmp_path, throttle, seed=7)


@pytest.mark.slow
def test_sigkill_anywhere_azure_never_exposes_a_partial_model(azurite, container, az_env, azurite_proxy, tmp_path):
    files = model(13)
    client = azurite.service(max_single_put_size=1 * MiB, max_block_size=1 * MiB).get_container_client(container)
    for name, data in files.items():  # the shards in blocks, as large files are uploaded
        client.upload_blob(f"crash/{name}", data)

    def throttle(on: bool) -> None:
        azurite_proxy.faults.throttle_bps = 3 * MiB if on else None

    _crash_campaign("az", f"az://devstoreaccount1/{container}/crash", az_env, files, tmp_path, throttle, seed=7)


@pytest.mark.slow
def test_sigkill_anywhere_oci_never_exposes_a_partial_model(oci_registry, clean_env, tmp_path):
    files = model(13)
    oci_registry.push("acme/crash:v1", files)
    proxy = CountingProxy("127.0.0.1", oci_registry.port)
    env = {**clean_env, "DOCKER_CONFIG": str(tmp_path / "docker"), "PYTHONUNBUFFERED": "1"}

    def throttle(on: bool) -> None:
        proxy.faults.throttle_bps = 3 * MiB if on else None

    try:
        _crash_campaign("oci", f"oci://{proxy.url.removeprefix('http://')}/acme/crash:v1", env, files, tmp_path,
                        throttle, seed=7)
    finally:
        proxy.close()


@pytest.mark.slow
def test_sigkill_anywhere_https_never_exposes_a_partial_model(tmp_path, clean_env):
    from tests.support.httpserver import HttpServer, private_ca, write_lockfile

    files = model(13)
    ca, context = private_ca(tmp_path / "tls")
    env = {**{k: v for k, v in clean_env.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")},
           "SSL_CERT_FILE": str(ca), "PYTHONUNBUFFERED": "1"}
    with HttpServer(tls=context) as server:
        for name, data in files.items():
            server.put(f"/crash/{name}", data)
        lock = write_lockfile(tmp_path / "crash.lock", f"{server.url}/crash/", files)

        def throttle(on: bool) -> None:
            server.faults.throttle_bps = 3 * MiB if on else None

        _crash_campaign("https", f"{server.url}/crash/", env, files, tmp_path, throttle, seed=7,
                        model_args=["--lockfile", str(lock)])


@pytest.mark.slow
def test_the_campaign_killed_at_least_30_times_and_exposed_nothing():
    """Runs after the campaigns (file order): the issue's minimum, across S3, HF, GCS, Azure, OCI and HTTPS."""
    if TOTALS["kills"] == 0:
        pytest.skip("the crash campaigns did not run in this session")
    print(f"\ncrash-anywhere total: {TOTALS['kills']} SIGKILLs, {TOTALS['exposed']} partial models exposed")
    assert TOTALS["kills"] >= 30
    assert TOTALS["exposed"] == 0
