"""Build the agent and example-server images for real and run them: sync from a local S3 server into
a named volume, serve an inference request, warm start, SIGTERM, layer caching, no leaked secrets, SBOM."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.helpers import (
    AGENT_TAG,
    BASE_NO_PYTHON,
    BASE_PYTHON,
    CACHE,
    REPO,
    SERVER_TAG,
    Build,
    PipSecrets,
    Report,
    build_image,
    image_layers,
    image_size_mb,
    podman,
    podman_env,
    require_tool,
)
from tests.support.proxy import CountingProxy
from tests.support.s3server import SeaweedS3, free_port

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO / "docker" / "example-server"))
from make_model import make_model  # noqa: E402

ACCESS_KEY = "WSIMG" + uuid.uuid4().hex[:10].upper()
SECRET_KEY = "wsimgsecret" + uuid.uuid4().hex
PAD_MB = 2  # a padded shard, so a cold sync moves megabytes and a warm start visibly moves none
PREDICT = {"inputs": [[0.5, -1, 2, 0, 1.5, -0.25, 3, -2]]}


# --- the agent image -------------------------------------------------------------------------------

def test_agent_image_is_small_non_root_and_labelled(agent_image: Build) -> None:
    info = json.loads(podman("image", "inspect", AGENT_TAG).stdout)[0]
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/usr/local/bin/tini", "--", "weightsync"]
    labels = config["Labels"]
    for key in ("title", "version", "revision", "created", "licenses", "source", "base.name"):
        assert f"org.opencontainers.image.{key}" in labels, key
    assert labels["org.opencontainers.image.title"] == "weightsync"
    assert image_size_mb(AGENT_TAG) < 400, "the agent image grew: check what the last change added"

    # Runs hardened, like the Kubernetes securityContext: read-only root, no capabilities, any uid.
    hardened = ["run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--no-healthcheck"]
    version = podman(*hardened, AGENT_TAG, "--version").stdout
    assert "weightsync" in version
    listing = podman(*hardened, "--entrypoint", "/bin/sh", AGENT_TAG, "-c",
                     "ls /opt/venv/bin; id -u; stat -c models-owner=%u /models").stdout
    assert "pip" not in listing.split(), "the runtime venv must not carry pip"
    assert "10001" in listing.split() and "models-owner=10001" in listing
    # The signing extra is in the image (charts/weightsync signature.required): a policy is accepted, and the
    # missing model.sig of an unsigned folder model is the refusal (exit 4), not "install weightsync[signing]".
    signed = podman(*hardened, "--entrypoint", "/bin/sh", AGENT_TAG, "-c",
                    "mkdir -p /tmp/m && echo '{}' > /tmp/m/config.json && /opt/venv/bin/python -c "
                    "\"from cryptography.hazmat.primitives.asymmetric import ec; from cryptography.hazmat.primitives "
                    "import serialization as s; open('/tmp/k.pem','wb').write(ec.generate_private_key(ec.SECP256R1())"
                    ".public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))\" && "
                    "weightsync sync --source /tmp/m --dest /tmp/v --trust-key /tmp/k.pem; echo exit=$?",
                    check=False)
    assert "exit=4" in signed.stdout and "has no model.sig" in signed.stderr, signed.stderr
    # So are the cloud identities (the gcs and azure extras): GKE / AKS workload identity works with this image.
    clouds = podman(*hardened, "--entrypoint", "/opt/venv/bin/python", AGENT_TAG, "-c",
                    "import google.auth, google.auth.transport.urllib3, azure.identity; print('clouds ok')")
    assert "clouds ok" in clouds.stdout


def test_agent_image_sbom(agent_image: Build, tmp_path: Path, report: Report) -> None:
    syft = require_tool("syft")
    archive = tmp_path / "agent.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), AGENT_TAG)
    CACHE.mkdir(parents=True, exist_ok=True)
    sbom = CACHE / "sbom-agent.cdx.json"
    env = {"SYFT_CHECK_FOR_APP_UPDATE": "false", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([syft, "scan", f"docker-archive:{archive}", "-q", "-o", f"cyclonedx-json={sbom}"],
                            env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    components = json.loads(sbom.read_text())["components"]
    names = {c["name"].lower() for c in components}
    for package in ("weightsync", "botocore", "awscrt", "filelock", "prometheus-client", "tqdm"):
        assert package in names or package.replace("-", "_") in names, f"{package} missing from the SBOM"
    for package in ("boto3", "huggingface-hub", "httpx2"):  # weightsync's S3 and Hub clients are its own
        assert package not in names and package.replace("-", "_") not in names, f"{package} is in the agent image"
    assert any(c.get("purl", "").startswith("pkg:deb/") for c in components), "no Debian packages in the SBOM"
    report.record("agent SBOM components", len(components))


# --- the example server: sync from S3, serve, warm start, SIGTERM -------------------------------------

@pytest.fixture(scope="module")
def model_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SeaweedS3, int]]:
    root = tmp_path_factory.mktemp("image-s3")
    server = SeaweedS3(root / "s3", ACCESS_KEY, SECRET_KEY).start()
    client = server.client()
    client.create_bucket(Bucket="models")
    files = make_model(root / "model", pad_mb=PAD_MB)
    for path in files:
        client.upload_file(str(path), "models", f"tiny-mlp/{path.name}")
    yield server, sum(p.stat().st_size for p in files)
    server.stop()


def start_server(volume: str, endpoint: str, port: int) -> tuple[str, subprocess.Popen[str]]:
    name = f"weightsync-example-{uuid.uuid4().hex[:8]}"
    command = [
        require_tool("podman"), "run", "--rm", "--name", name, "--network", "host", "--no-healthcheck",
        # the pod securityContext of k8s/, in podman terms
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-v", f"{volume}:/models",
        "-e", f"AWS_ENDPOINT_URL={endpoint}", "-e", f"AWS_ACCESS_KEY_ID={ACCESS_KEY}",
        "-e", f"AWS_SECRET_ACCESS_KEY={SECRET_KEY}", "-e", "AWS_REGION=us-east-1",
        "-e", "WEIGHTSYNC_SOURCE=s3://models/tiny-mlp", "-e", "WEIGHTSYNC_NAME=tiny-mlp",
        "-e", "WEIGHTSYNC_S3_ADDRESSING_STYLE=path", "-e", f"PORT={port}",
        SERVER_TAG,
    ]
    process = subprocess.Popen(command, env=podman_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    return name, process


def wait_for_prediction(port: int, process: subprocess.Popen[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the container exited ({process.returncode}):\n{process.stdout.read()}")
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/predict",
                                             data=json.dumps(PREDICT).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.load(response)
        except OSError as exc:
            last = exc
            time.sleep(0.2)
    raise AssertionError(f"no answer on port {port} after {timeout}s: {last}")


def stop_with_sigterm(name: str, process: subprocess.Popen[str]) -> tuple[float, int, str]:
    started = time.monotonic()
    podman("kill", "--signal", "TERM", name)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        podman("kill", name, check=False)
        output, _ = process.communicate(timeout=30)
        raise AssertionError(f"SIGTERM did not stop the container within 30 s:\n{output}") from None
    return time.monotonic() - started, process.returncode, output


def test_example_server_syncs_serves_warm_starts_and_stops_on_sigterm(
    server_image: Build, model_bucket: tuple[SeaweedS3, int], volume: str, report: Report
) -> None:
    s3, model_bytes = model_bucket
    host, s3_port = s3.endpoint.removeprefix("http://").split(":")
    proxy = CountingProxy(host, int(s3_port))  # counts what crosses the wire between the container and S3
    try:
        # Cold: the volume is empty, weightsync downloads, verifies, publishes, then execs the server.
        port = free_port()
        started = time.monotonic()
        name, process = start_server(volume, proxy.url, port)
        answer = wait_for_prediction(port, process)
        cold_seconds = time.monotonic() - started
        assert answer["labels"] == ["bird"] and len(answer["outputs"][0]) == 4
        pid1 = podman("exec", name, "cat", "/proc/1/comm").stdout.strip()
        assert pid1 == "tini", f"PID 1 is {pid1!r}, not tini"
        stopped_in, code, cold_log = stop_with_sigterm(name, process)
        cold_down = proxy.stats.bytes_down
        assert cold_down >= model_bytes, f"cold start moved {cold_down} bytes, the model is {model_bytes}"
        assert code == 0, f"exit code {code} after SIGTERM:\n{cold_log}"
        assert stopped_in < 5, f"SIGTERM took {stopped_in:.1f}s to stop the server"
        assert "SIGTERM" in cold_log, cold_log

        # Warm: the same volume, a new container: no download, and the logs say so.
        proxy.stats.reset()
        port = free_port()
        started = time.monotonic()
        name, process = start_server(volume, proxy.url, port)
        assert wait_for_prediction(port, process)["labels"] == ["bird"]
        warm_seconds = time.monotonic() - started
        warm_stop, code, warm_log = stop_with_sigterm(name, process)
        assert code == 0, warm_log
        assert proxy.stats.bytes_down < 64 * 1024, f"warm start moved {proxy.stats.bytes_down} bytes"
        assert re.search(r"warm start|already published|fetched 0 B", warm_log, re.I), warm_log
        assert "MODEL_DIR=/models/tiny-mlp/" in warm_log
    finally:
        proxy.close()
    report.record("example-server cold start to first answer s", round(cold_seconds, 1))
    report.record("example-server warm start to first answer s", round(warm_seconds, 1))
    report.record("SIGTERM to exit s", round(max(stopped_in, warm_stop), 2))


# --- secrets never land in a layer ---------------------------------------------------------------

PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)\s+-----END CERTIFICATE-----", re.S)


def pem_bodies(data: bytes) -> set[bytes]:
    return {re.sub(rb"\s+", b"", m.group(1)) for m in PEM.finditer(data)}


def layer_files(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every regular file in every layer of a `podman save` archive."""
    with tarfile.open(archive) as outer:
        for member in outer.getmembers():
            if not member.name.endswith(".tar"):
                continue
            layer = outer.extractfile(member)
            assert layer is not None
            with tarfile.open(fileobj=io.BytesIO(layer.read())) as inner:
                for item in inner.getmembers():
                    if item.isfile():
                        handle = inner.extractfile(item)
                        yield item.name.removeprefix("./"), handle.read() if handle else b""


PUBLIC_BUNDLES = re.compile(r"^etc/ssl/certs/ca-certificates\.crt$|/(certifi|botocore)/cacert\.pem$")


@pytest.mark.parametrize("which", ["agent", "server"])
def test_no_build_secret_in_any_layer_or_history(
    which: str, request: pytest.FixtureRequest, pip_secrets: PipSecrets, tmp_path: Path
) -> None:
    tag = AGENT_TAG if which == "agent" else SERVER_TAG
    request.getfixturevalue("agent_image" if which == "agent" else "server_image")
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    assert pip_secrets.marker not in history
    archive = tmp_path / "image.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), tag)

    # The certificates this machine trusts beyond the public CAs that the image ships anyway (e.g. a
    # TLS-intercepting proxy's CA) were mounted for pip: none of them may be in the image.
    public: set[bytes] = set()
    for path, content in layer_files(archive):
        if PUBLIC_BUNDLES.search(path):
            public |= pem_bodies(content)
    private = pem_bodies(pip_secrets.ca_bundle.read_bytes()) - public if pip_secrets.ca_bundle else set()
    probes = [pip_secrets.marker.encode(), *private]

    leaks = []
    for path, content in layer_files(archive):
        if path.rsplit("/", 1)[-1] in {"pip.conf", "ca.crt"} or path.startswith("run/secrets/"):
            leaks.append(path)
        flat = re.sub(rb"\s+", b"", content) if b"BEGIN CERT" in content else content
        leaks.extend(path for probe in probes if probe in flat)
    assert not leaks, f"build secrets found in the layers of {tag}: {sorted(set(leaks))}"


# --- cached rebuilds ---------------------------------------------------------------------------------

def copy_context(destination: Path) -> Path:
    """The build context as .dockerignore lets it through, in a scratch directory we may edit."""
    for name in (".dockerignore", "pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, destination / name)
    shutil.copytree(REPO / "weightsync", destination / "weightsync",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "docker", destination / "docker", ignore=shutil.ignore_patterns(".env"))
    return destination


def test_code_only_change_reuses_dependency_layers(
    agent_image: Build, server_image: Build, pip_secrets: PipSecrets, tmp_path: Path, report: Report
) -> None:
    # A scratch copy of the context, built once as is (from the cache the session fixtures filled),
    # then again after touching only application code.
    context = copy_context(tmp_path)
    cases = [
        ("example-server", "docker/example-server/Dockerfile", "docker/example-server/server.py"),
        ("agent", "docker/Dockerfile", "weightsync/__init__.py"),
    ]
    for name, dockerfile, touched in cases:
        base_tag = f"localhost/weightsync-rebuild-test:{name}-{uuid.uuid4().hex[:8]}"
        tag = f"{base_tag}-touched"
        try:
            build_image(dockerfile, base_tag, pip_secrets, context=context)
            with (context / touched).open("a") as handle:
                handle.write(f"\n# touched by the rebuild test {uuid.uuid4().hex}\n")
            rebuilt = build_image(dockerfile, tag, pip_secrets, context=context)
            before, after = image_layers(base_tag), image_layers(tag)
            # Only the top layer (the application code) differs; base, user, tini and dependencies are reused.
            assert len(before) == len(after) and before[:-1] == after[:-1], f"{name}: a lower layer was rebuilt"
            assert before[-1] != after[-1], f"{name}: the code change did not reach the image"
            assert "Using cache" in rebuilt.log
            assert not re.search(r"Successfully installed .*botocore", rebuilt.log), "the locked deps were reinstalled"
            report.record(f"{name} rebuild after touching {touched} s", rebuilt.seconds)
        finally:
            podman("rmi", "-f", tag, base_tag, check=False)


# --- the CUDA variant's code path --------------------------------------------------------------------

def test_python_less_runtime_base_gets_python_from_the_distribution(
    base_images, pip_secrets: PipSecrets, report: Report
) -> None:
    """The CUDA variant's base (nvidia/cuda:*-runtime-ubuntu22.04) has no Python: the Dockerfile installs
    python3.11 with apt. No CUDA base can be pulled here, so a Python-less Debian base stands in for it:
    the same Dockerfile branch, the same lock file, only without the CUDA libraries."""
    tag = f"localhost/weightsync-example:test-nopython-{uuid.uuid4().hex[:6]}"
    try:
        built = build_image("docker/example-server/Dockerfile", tag, pip_secrets, runtime_base=BASE_NO_PYTHON)
        # The apt step may come from the layer cache on a rerun, so the proof is the running image, not the log.
        out = podman("run", "--rm", "--no-healthcheck", "--read-only", "--entrypoint", "python", tag, "-c",
                     "import sys, numpy, safetensors, weightsync; print(sys.executable, sys.version_info[:2])").stdout
        assert "(3, 11)" in out
        report.record("example-server on a Python-less base (CUDA code path) build s", built.seconds)
        report.record("example-server on a Python-less base size MB", image_size_mb(tag))
    finally:
        podman("rmi", "-f", tag, check=False)


# --- .dockerignore ---------------------------------------------------------------------------------

def test_dockerignore_keeps_weights_venvs_and_secrets_out_of_the_context(base_images, tmp_path: Path) -> None:
    context = copy_context(tmp_path)
    planted = [".env", "docker/.env", ".venv/bin/python", ".git/config", "models/model.safetensors",
               "weightsync/secret.pem", "weights.bin", "__pycache__/x.pyc", ".cache/images/base.tar",
               "id_rsa.key", "notes.txt"]
    for name in planted:
        path = context / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("must not reach the build context\n")
    (context / "probe.Dockerfile").write_text(f"FROM {BASE_PYTHON}\nCOPY . /context/\n")
    tag = f"localhost/weightsync-context-probe:{uuid.uuid4().hex[:8]}"
    try:
        podman("build", "--pull=never", "-f", str(context / "probe.Dockerfile"), "-t", tag, str(context))
        listing = podman("run", "--rm", "--entrypoint", "find", tag, "/context", "-type", "f").stdout.split()
    finally:
        podman("rmi", "-f", tag, check=False)
    inside = {p.removeprefix("/context/") for p in listing}
    assert not inside & set(planted), f"reached the build context: {sorted(inside & set(planted))}"
    assert "weightsync/__init__.py" in inside and "pyproject.toml" in inside
    assert "docker/requirements/agent.lock" in inside and "docker/example-server/server.py" in inside

