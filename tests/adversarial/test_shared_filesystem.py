"""Two nodes, one shared volume, for real: the locks on JuiceFS mounted twice.

The other lock tests share a volume between processes of one machine (one kernel, one local filesystem).
Here the volume is a real shared filesystem: JuiceFS with its metadata in a private redis-server on loopback
and its data in a local directory, mounted at two mountpoints by two `juicefs mount` processes, standing for
two Kubernetes nodes that share one ReadWriteMany PVC (tests/support/juicefs.py). Every weightsync process
runs through one of the two mounts; everything a test asserts about the other node it reads through the
other mount. The model (one 24 MiB shard uploaded with boto3's defaults, so a multipart CRC32 composite, and
a few small files) comes from SeaweedFS through the counting proxy, which measures what crossed the wire.

What JuiceFS does, as observed here (and asserted below): flock(2) taken through one mount excludes a process
on the other mount (the locks live in the metadata engine), and the lock of a SIGKILLed holder is released
at once, so `--lock-mode auto` probes flock as working and uses it; the lease file and its heartbeat (rewritten
in place, not fsynced) are seen through the other mount about a second later.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.adversarial.harness import MiB, Proc, exposure, last_path, model, ws
from tests.support.helpers import tree_bytes
from tests.support.juicefs import JuiceFS, Unavailable, require_or_skip

pytestmark = pytest.mark.slow

SHARD = 24 * MiB
CRASH = {"kills": 0, "finished_before_kill": 0, "exposed": 0, "a": 0, "b": 0}


@pytest.fixture(scope="module")
def shared_fs(tmp_path_factory: pytest.TempPathFactory):
    fs = JuiceFS(tmp_path_factory.mktemp("juicefs"))
    try:
        fs.start()
    except Unavailable as exc:
        require_or_skip(str(exc))
    print(f"\n{fs.describe()}")
    try:
        yield fs
    finally:
        fs.stop()


def _upload(s3_server, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """As users upload: boto3's managed transfer with its defaults (multipart above 8 MiB, CRC32)."""
    client = s3_server.client()
    for name, data in files.items():
        client.upload_fileobj(io.BytesIO(data), bucket, f"{prefix}/{name}")


def _dests(fs: JuiceFS, label: str) -> tuple[Path, Path]:
    """The same --dest directory of the shared volume, as node A and node B see it."""
    relative = Path(f"{label}-{uuid.uuid4().hex[:8]}") / "models"
    return fs.mounts[0] / relative, fs.mounts[1] / relative


def _events(stderr: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def _published(stderr: str) -> dict:
    events = [e for e in _events(stderr) if e.get("event") == "published"]
    assert len(events) == 1, stderr
    return events[0]


def _wait_for(predicate, timeout: float, what: str, process: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(f"weightsync exited {process.popen.returncode} before {what}:\n{process.stderr}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f":\n{process.stderr}" if process else ""))
        time.sleep(0.02)


def _lock_file(locks: Path, suffix: str) -> Path | None:
    found = sorted(locks.glob(f"*{suffix}")) if locks.is_dir() else []
    return found[0] if found else None


def _published_state(name_dir: Path) -> tuple[dict[str, object], dict[str, int]]:
    """Everything a reader could be handed (bytes, inode, mode of every published path, `current`, the
    revisions, the manifests), and apart from it each published path's mtime."""
    state: dict[str, object] = {"current": os.readlink(name_dir / "current"),
                                "revisions": sorted(p.name for p in (name_dir / "revisions").iterdir()),
                                "manifests": tree_bytes(name_dir / "manifests")}
    mtimes = {}
    for revision in state["revisions"]:
        directory = name_dir / "revisions" / revision
        for path in sorted(directory.rglob("*")):
            info = os.lstat(path)
            key = f"{revision}/{path.relative_to(directory)}"
            state[key] = (path.read_bytes() if path.is_file() else None, info.st_ino, info.st_mode)
            mtimes[key] = info.st_mtime_ns
    return state, mtimes


@pytest.mark.parametrize("lock_mode", ["auto", "lease"])
def test_concurrent_syncs_through_two_mounts_fetch_the_model_once(shared_fs, s3_server, bucket, s3_env, s3_proxy,
                                                                  lock_mode):
    files = model(41, shards=1, shard_size=SHARD)
    _upload(s3_server, bucket, "once", files)
    size = sum(map(len, files.values()))
    dests = _dests(shared_fs, f"once-{lock_mode}")
    s3_proxy.faults.throttle_bps = 12 * MiB  # about 2 s of download: every process starts while it runs
    s3_proxy.stats.reset()
    env = {**s3_env, "WEIGHTSYNC_LOCK_MODE": lock_mode, "WEIGHTSYNC_LEASE_TIMEOUT": "5",
           "WEIGHTSYNC_LOG_FORMAT": "json"}
    per_mount = 2
    processes = [(node, Proc("sync", "--source", f"s3://{bucket}/once", "--dest", str(dests[node]), "--name", "m",
                             env=env, workdir=shared_fs.workdir / "logs"))
                 for _ in range(per_mount) for node in (0, 1)]
    codes = [p.wait(180) for _, p in processes]
    assert codes == [0] * len(processes), [p.stderr for _, p in processes]
    relative = {last_path(p).relative_to(shared_fs.mounts[node]) for node, p in processes}
    assert len(relative) == 1, relative
    for node, p in processes:
        assert tree_bytes(last_path(p)) == files, f"node {node} reads a different model"
    fetched = s3_proxy.stats.bytes_down
    published = [(node, _published(p.stderr)) for node, p in processes]
    warm = sum(bool(e["warm"]) for _, e in published)
    downloader = {node for node, e in published if not e["warm"]}
    # Waited for the lock, then found the model published: excluded by the holder, not merely started late.
    waited = {node for node, e in published if e["warm"] and e["lock_wait_seconds"] > 0.3}
    locks = dests[1] / "m" / ".locks"
    lock_files = sorted(p.name for p in locks.iterdir())
    fell_back = any("using a lease file" in p.stderr for _, p in processes)
    print(f"\n{len(processes)} processes through 2 JuiceFS mounts ({lock_mode}): model {size} bytes, {fetched} "
          f"bytes crossed the wire ({fetched / size:.3f}x), {warm} warm starts, lock waits "
          f"{[('ab'[node], e['lock_wait_seconds']) for node, e in published]}; .locks holds {lock_files}")
    assert fetched <= 1.05 * size, (fetched, size)
    assert warm == len(processes) - 1
    assert waited - downloader, "no process on the other node waited for the holder's lock"
    revision = relative.pop().name
    if lock_mode == "auto":
        # JuiceFS implements flock across clients: the probe passes and the flock is what excluded them.
        assert not fell_back, [p.stderr for _, p in processes]
        assert f"{revision}.lock" in lock_files and ".flock-probe" in lock_files
        assert not any(name.endswith(".lease") for name in lock_files)
    else:
        assert f"{revision}.lock" not in lock_files and not any(".lease" in name for name in lock_files), \
            "the lease is released after publishing and no flock was taken"


@pytest.mark.parametrize("lock_mode", ["auto", "lease"])
def test_a_holder_sigkilled_through_one_mount_is_taken_over_through_the_other_and_resumes(
        shared_fs, s3_server, bucket, s3_env, s3_proxy, lock_mode):
    files = model(42, shards=1, shard_size=SHARD)
    _upload(s3_server, bucket, "takeover", files)
    size = sum(map(len, files.values()))
    dest_a, dest_b = _dests(shared_fs, f"takeover-{lock_mode}")
    lease_timeout = 3.0
    args = ("sync", "--source", f"s3://{bucket}/takeover", "--name", "m", "--lock-mode", lock_mode,
            "--lease-timeout", f"{lease_timeout:g}")
    s3_proxy.faults.throttle_bps = 4 * MiB
    s3_proxy.stats.reset()
    holder = Proc(*args, "--dest", str(dest_a), env=s3_env, workdir=shared_fs.workdir / "logs")
    _wait_for(lambda: s3_proxy.stats.bytes_down >= 10 * MiB, 60, "10 MiB downloaded", holder)
    locks_b = dest_b / "m" / ".locks"
    # Seen from node B: node A holds the lock, and says so.
    if lock_mode == "auto":
        record_path = _lock_file(locks_b, ".lock.holder")
        assert record_path is not None, sorted(locks_b.iterdir())
        record = json.loads(record_path.read_text())
        assert record["mode"] == "flock", record
    else:
        record_path = _lock_file(locks_b, ".lease")
        assert record_path is not None, sorted(locks_b.iterdir())
        record = json.loads(record_path.read_text())
    assert record["pid"] == holder.pid, record
    assert holder.kill(), "the holder finished before it could be killed"
    held_down = s3_proxy.stats.bytes_down
    assert held_down < size * 0.9, "the holder got too far for a resume to show"

    freed_after = None
    if lock_mode == "auto":
        # The fact the flock path relies on, checked through node B: a dead holder's flock is gone at once.
        lock_b = record_path.with_name(record_path.name.removesuffix(".holder"))
        fd = os.open(lock_b, os.O_RDWR)
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() - started < 5, "JuiceFS kept the SIGKILLed holder's flock"
                    time.sleep(0.01)
            freed_after = time.monotonic() - started
        finally:
            os.close(fd)  # releases it again before node B syncs

    s3_proxy.faults.throttle_bps = None
    s3_proxy.stats.reset()
    taker = ws("--log-format", "json", *args, "--dest", str(dest_b), env=s3_env, timeout=120)
    assert taker.returncode == 0, taker.stderr
    published = _published(taker.stderr)
    fetched = s3_proxy.stats.bytes_down
    print(f"\ntakeover through the other mount ({lock_mode}): the SIGKILLed holder had {held_down} bytes through "
          f"the proxy; the taker waited {published['lock_wait_seconds']}s for the lock"
          + (f" (flock free through mount B {freed_after:.3f}s after the kill)" if freed_after is not None else "")
          + f", resumed {published['bytes_resumed']} bytes, fetched {fetched} of {size} at the proxy")
    assert tree_bytes(last_path(taker)) == files
    assert tree_bytes(dest_a / "m" / "current") == files, "node A reads the model node B published"
    assert published["bytes_resumed"] > 0, published
    assert fetched < size - 4 * MiB, (fetched, size)
    if lock_mode == "auto":
        assert freed_after is not None and freed_after < 1.0
        assert published["lock_wait_seconds"] < 1.0, published
        assert "took over" not in taker.stderr
    else:
        assert "took over the stale lease" in taker.stderr and f"pid {holder.pid}" in taker.stderr
        assert lease_timeout * 0.8 <= published["lock_wait_seconds"] < lease_timeout + 10, published


def test_a_frozen_lease_holder_loses_its_lease_to_the_other_mount_and_exits_5_without_publishing(
        shared_fs, s3_server, bucket, s3_env, s3_proxy):
    files = model(43, shards=1, shard_size=SHARD)
    _upload(s3_server, bucket, "frozen", files)
    dest_a, dest_b = _dests(shared_fs, "frozen")
    args = ("sync", "--source", f"s3://{bucket}/frozen", "--name", "m", "--lock-mode", "lease",
            "--lease-timeout", "3")
    s3_proxy.faults.throttle_bps = 2 * MiB
    frozen = Proc(*args, "--dest", str(dest_a), env=s3_env, workdir=shared_fs.workdir / "logs")
    locks_b = dest_b / "m" / ".locks"
    _wait_for(lambda: _lock_file(locks_b, ".lease") is not None and s3_proxy.stats.bytes_down >= 4 * MiB, 60,
              "the lease, seen through mount B, and 4 MiB downloaded", frozen)
    os.kill(frozen.pid, signal.SIGSTOP)  # node A's pod frozen: cgroup freezer, swap storm, VM pause
    try:
        s3_proxy.faults.throttle_bps = None
        taker = ws(*args, "--dest", str(dest_b), env=s3_env, timeout=90)
        assert taker.returncode == 0, taker.stderr
        assert "took over the stale lease" in taker.stderr and f"pid {frozen.pid}" in taker.stderr
        name_b = dest_b / "m"
        assert tree_bytes(name_b / "current") == files
        before, mtimes_before = _published_state(name_b)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    code = frozen.wait(60)
    last = frozen.stderr.strip().splitlines()[-1]
    print(f"\nfrozen lease holder through mount A woke up: exit {code}, last line: {last}")
    assert code == 5, frozen.stderr
    assert last.startswith("weightsync: error:") and "lease" in last, frozen.stderr
    assert not any(line.startswith("weightsync: published") for line in frozen.stderr.splitlines())
    time.sleep(1.5)  # JuiceFS's attribute cache (1 s): what node A wrote, node B sees by now
    after, mtimes_after = _published_state(name_b)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], f"the frozen holder changed what was published: {changed}"
    # The new holder resumed the frozen one's bytes from a copy (a fresh inode), so the writes the woken holder
    # still makes through its open file descriptor land in a file nobody reads: not even an mtime moves.
    written = sorted(k for k in mtimes_before if mtimes_after.get(k) != mtimes_before[k])
    assert written == [], f"the woken holder wrote into published files: {written}"
    assert exposure(name_b, files) == [] and exposure(dest_a / "m", files) == []
    for dest in (dest_a, dest_b):
        verify = ws("verify", "--dest", str(dest), "--name", "m", env=s3_env)
        assert verify.returncode == 0, verify.stderr


def test_sigkill_anywhere_through_either_mount_never_exposes_a_partial_model_to_the_other(
        shared_fs, s3_server, bucket, s3_env, s3_proxy):
    files = model(44, shards=1, shard_size=SHARD)
    _upload(s3_server, bucket, "crash", files)
    source = f"s3://{bucket}/crash"
    rng = random.Random(17)
    root = _dests(shared_fs, "crash")
    logs = shared_fs.workdir / "logs"
    problems: list[str] = []
    volumes = 0

    def fresh_volume() -> tuple[Path, Path]:
        nonlocal volumes
        volumes += 1
        return root[0] / f"vol{volumes}", root[1] / f"vol{volumes}"

    def start(dest: Path, extra_env: dict[str, str] | None = None) -> Proc:
        return Proc("sync", "--source", source, "--dest", str(dest), "--name", "m", env={**s3_env, **(extra_env or {})},
                    workdir=logs)

    def check(reader_dest: Path, what: str) -> None:
        seen = exposure(reader_dest / "m", files)
        CRASH["exposed"] += bool(seen)
        problems.extend(f"{what}: {p}" for p in seen)

    def clean_finish(dests: tuple[Path, Path]) -> None:
        """A clean sync through each mount, then `weightsync verify` through each."""
        s3_proxy.faults.throttle_bps = None
        for dest in dests:
            again = ws("sync", "--source", source, "--dest", str(dest), "--name", "m", env=s3_env)
            assert again.returncode == 0, again.stderr
            assert tree_bytes(last_path(again)) == files
        for dest in dests:
            verify = ws("verify", "--source", source, "--dest", str(dest), "--name", "m", env=s3_env)
            assert verify.returncode == 0, verify.stderr
            check(dest, "after the clean finish")
        s3_proxy.faults.throttle_bps = throttle

    throttle = 12 * MiB
    s3_proxy.faults.throttle_bps = throttle
    started = time.monotonic()
    calibration = ws("sync", "--source", source, "--dest", str(root[0] / "calibration"), "--name", "m", env=s3_env)
    assert calibration.returncode == 0, calibration.stderr
    full_run = time.monotonic() - started

    # Random moments, on one volume in a row (each run resumes what the previous one, on either node, left).
    random_kills, deadline = 11, time.monotonic() + 100
    while CRASH["kills"] < random_kills and time.monotonic() < deadline:
        dests = fresh_volume()
        for _ in range(4):
            node = rng.randrange(2)
            process = start(dests[node])
            time.sleep(rng.uniform(0.05, full_run * 1.1))
            if process.kill():
                CRASH["kills"] += 1
                CRASH["ab"[node]] += 1
            else:
                CRASH["finished_before_kill"] += 1
            check(dests[1 - node], f"kill #{CRASH['kills']} through mount {'ab'[node]} after "
                                   f"{time.monotonic() - process.started:.2f}s")
            if (dests[1 - node] / "m" / "current").exists() or CRASH["kills"] >= random_kills:
                break
        clean_finish(dests)

    # Exact moments, alternating the mounts: holding the lock, before publish, manifest written, renamed.
    for index, point in enumerate(("locked", "before-publish", "manifest-written", "renamed")):
        dests, node = fresh_volume(), index % 2
        process = start(dests[node], {"WEIGHTSYNC_TEST_PAUSE_AT": point})
        assert process.wait_for(f"paused at {point}", timeout=90), process.stderr
        assert process.kill()
        CRASH["kills"] += 1
        CRASH["ab"[node]] += 1
        check(dests[1 - node], f"kill at {point} through mount {'ab'[node]}")
        if point == "renamed":
            assert not os.path.lexists(dests[1 - node] / "m" / "current")
        clean_finish(dests)

    print(f"\nshared-fs crash-anywhere: {CRASH['kills']} SIGKILLs through 2 JuiceFS mounts (a: {CRASH['a']}, "
          f"b: {CRASH['b']}; {CRASH['finished_before_kill']} runs finished before their kill, {volumes} volumes, "
          f"{time.monotonic() - started:.0f}s), {CRASH['exposed']} checks through the other mount saw a partial "
          "model")
    assert problems == [], "\n".join(problems)
    assert CRASH["kills"] >= 12


def test_a_woken_lease_holder_whose_part_file_was_discarded_still_exits_5(
        shared_fs, s3_server, bucket, s3_env, tmp_path):
    """The new holder re-verifies the frozen one's bytes, finds them bad (a proxy in front of node A flipped
    them) and discards its part file; the woken holder's writes and closes then fail (EBADF on JuiceFS), and it
    must still report the lost lease, not an unexpected error."""
    from tests.support.proxy import CountingProxy

    files = model(45, shards=1, shard_size=SHARD)
    _upload(s3_server, bucket, "discarded", files)
    dest_a, dest_b = _dests(shared_fs, "discarded")
    args = ("sync", "--source", f"s3://{bucket}/discarded", "--name", "m", "--lock-mode", "lease",
            "--lease-timeout", "3")
    proxy_a = CountingProxy("127.0.0.1", s3_server.s3_port)
    try:
        proxy_a.faults.corrupt_key = "model-00001-of-00001.bin"
        proxy_a.faults.corrupt_offsets = tuple(range(1 * MiB, SHARD, 4096))
        proxy_a.faults.throttle_bps = 1 * MiB
        frozen = Proc(*args, "--dest", str(dest_a), env={**s3_env, "AWS_ENDPOINT_URL": proxy_a.url},
                      workdir=tmp_path / "logs")
        _wait_for(lambda: _lock_file(dest_b / "m" / ".locks", ".lease") is not None
                  and proxy_a.stats.bytes_down >= 2 * MiB, 60, "the lease and 2 MiB through node A", frozen)
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            taker = ws(*args, "--dest", str(dest_b), env=s3_env, timeout=120)
            assert taker.returncode == 0, taker.stderr
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        code = frozen.wait(60)
        assert code == 5, frozen.stderr
        assert "lease" in frozen.stderr.strip().splitlines()[-1]
        assert tree_bytes(dest_b / "m" / "current") == files
        assert exposure(dest_b / "m", files) == []
    finally:
        proxy_a.close()
