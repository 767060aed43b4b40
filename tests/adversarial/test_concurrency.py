"""Many pods, one volume: one download per revision, everyone gets the same path; different ones don't wait."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.adversarial.harness import MiB, Proc, last_path, model, ws
from tests.support.helpers import tree_bytes, upload_model


@pytest.mark.slow
@pytest.mark.parametrize("lock_mode", ["auto", "lease"])
def test_eight_processes_same_source_same_empty_volume_fetch_once(s3_server, bucket, s3_env, s3_proxy, tmp_path,
                                                                   lock_mode):
    files = model(21, shards=4, shard_size=4 * MiB)
    upload_model(s3_server.client(), bucket, "many", files)
    size = sum(map(len, files.values()))
    s3_proxy.faults.throttle_bps = 8 * MiB
    s3_proxy.stats.reset()
    env = {**s3_env, "WEIGHTSYNC_LOCK_MODE": lock_mode, "WEIGHTSYNC_LEASE_TIMEOUT": "5"}
    processes = [Proc("sync", "--source", f"s3://{bucket}/many", "--dest", str(tmp_path / "vol"), env=env,
                      workdir=tmp_path / "logs") for _ in range(8)]
    codes = [p.wait(180) for p in processes]
    assert codes == [0] * 8, [p.stderr for p in processes]
    paths = {p.stdout.strip().splitlines()[-1] for p in processes}
    assert len(paths) == 1
    assert tree_bytes(Path(paths.pop())) == files
    fetched = s3_proxy.stats.bytes_down
    print(f"\n8 processes ({lock_mode}): model {size} bytes, {fetched} bytes crossed the wire "
          f"({fetched / size:.3f}x)")
    assert fetched <= 1.05 * size, (fetched, size)
    assert sum("warm start" in p.stderr for p in processes) == 7


@pytest.mark.slow
def test_eight_processes_same_azure_source_same_empty_volume_fetch_once(azurite, container, az_env, azurite_proxy,
                                                                        tmp_path):
    files = model(23, shards=4, shard_size=4 * MiB)
    client = azurite.service().get_container_client(container)
    for name, data in files.items():
        client.upload_blob(f"many/{name}", data)
    size = sum(map(len, files.values()))
    azurite_proxy.faults.throttle_bps = 8 * MiB
    azurite_proxy.stats.reset()
    processes = [Proc("sync", "--source", f"az://devstoreaccount1/{container}/many", "--dest", str(tmp_path / "vol"),
                      env=az_env, workdir=tmp_path / "logs") for _ in range(8)]
    codes = [p.wait(180) for p in processes]
    assert codes == [0] * 8, [p.stderr for p in processes]
    paths = {p.stdout.strip().splitlines()[-1] for p in processes}
    assert len(paths) == 1
    assert tree_bytes(Path(paths.pop())) == files
    fetched = azurite_proxy.stats.bytes_down
    print(f"\n8 processes (az): model {size} bytes, {fetched} bytes crossed the wire ({fetched / size:.3f}x)")
    assert fetched <= 1.05 * size, (fetched, size)
    assert sum("warm start" in p.stderr for p in processes) == 7


@pytest.mark.slow
def test_two_revisions_and_two_sources_into_one_volume_do_not_block_each_other(hub, hub_env, tmp_path):
    slow = model(22, shards=2, shard_size=3 * MiB)
    first = hub.add_commit("acme/two", slow)
    second = hub.add_commit("acme/two", {"config.json": b'{"v": 2}', "extra.bin": b"x" * 5000}, branch="small")
    hub.add_commit("acme/other", {"config.json": b"{}", "w.safetensors": b"w" * 10000})
    hub.faults.throttle_bps = MiB // 3  # only revision `first` has big files: about 9 s per shard
    hub.faults.only_paths = {k for k in slow if k.startswith("model-")}
    dest = tmp_path / "vol"
    holder = Proc("sync", "--source", "hf://acme/two", "--revision", first, "--dest", str(dest), env=hub_env,
                  workdir=tmp_path / "logs")
    lock = dest / "hf--acme--two" / ".locks" / f"{first}.lock.holder"
    deadline = time.monotonic() + 30
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.exists(), holder.stderr
    started = time.monotonic()
    other_revision = ws("sync", "--source", "hf://acme/two", "--revision", second, "--dest", str(dest),
                        "--lock-timeout", "2", env=hub_env)
    other_source = ws("sync", "--source", "hf://acme/other", "--dest", str(dest), "--lock-timeout", "2",
                      env=hub_env)
    elapsed = time.monotonic() - started
    assert other_revision.returncode == 0, other_revision.stderr
    assert other_source.returncode == 0, other_source.stderr
    assert holder.popen.poll() is None, "the slow download must still be running: nobody waited for it"
    assert last_path(other_revision).name == second
    assert elapsed < 20
    assert holder.wait(120) == 0, holder.stderr
    assert tree_bytes(Path(holder.stdout.splitlines()[-1])) == slow


@pytest.mark.slow
def test_eight_processes_same_https_lockfile_same_empty_volume_fetch_once(tmp_path, clean_env):
    from tests.support.httpserver import HttpServer, private_ca, write_lockfile
    from tests.support.proxy import CountingProxy

    files = model(23, shards=4, shard_size=4 * MiB)
    size = sum(map(len, files.values()))
    ca, context = private_ca(tmp_path / "tls")
    env = {**{k: v for k, v in clean_env.items() if k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")},
           "SSL_CERT_FILE": str(ca), "PYTHONUNBUFFERED": "1"}
    with HttpServer(tls=context) as server:
        for name, data in files.items():
            server.put(f"/many/{name}", data)
        proxy = CountingProxy("127.0.0.1", server.port)  # counts at the wire: TLS records, HEADs and handshakes too
        proxy.faults.throttle_bps = 8 * MiB
        try:
            lock = write_lockfile(tmp_path / "many.lock", f"https://127.0.0.1:{proxy.port}/many/", files)
            processes = [Proc("sync", "--lockfile", str(lock), "--dest", str(tmp_path / "vol"), env=env,
                              workdir=tmp_path / "logs") for _ in range(8)]
            codes = [p.wait(180) for p in processes]
        finally:
            proxy.close()
    assert codes == [0] * 8, [p.stderr for p in processes]
    paths = {p.stdout.strip().splitlines()[-1] for p in processes}
    assert len(paths) == 1
    assert tree_bytes(Path(paths.pop())) == files
    fetched = proxy.stats.bytes_down
    print(f"\n8 processes (https): model {size} bytes, {fetched} bytes crossed the wire ({fetched / size:.3f}x)")
    assert fetched <= 1.05 * size, (fetched, size)
    assert sum("warm start" in p.stderr for p in processes) == 7
