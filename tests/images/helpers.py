"""Helpers shared by the image tests and their fixtures (conftest.py): tools, podman, builds, report."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = REPO / ".cache" / "images"
CONTAINERS_CONF = HERE / "containers.conf"

BASE_PYTHON = "localhost/weightsync-test/python:3.11-slim-bookworm"  # stands in for python:3.11-slim-bookworm
BASE_NO_PYTHON = "localhost/weightsync-test/minbase:bookworm"  # stands in for a CUDA runtime base
AGENT_TAG = "localhost/weightsync:test"
SERVER_TAG = "localhost/weightsync-example:test-cpu"

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def find_tool(name: str) -> str | None:
    """A tool from this virtualenv's bin (pip-installed) or PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def require_tool(name: str) -> str:
    path = find_tool(name)
    if path:
        return path
    message = f"`{name}` is missing: run scripts/install-image-tools.sh"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    env.setdefault("BUILDAH_FORMAT", "docker")
    return env


def podman(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [require_tool("podman"), *args],
        env=podman_env(),
        text=True,
        capture_output=True,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


# --- what the tests measured, printed at the end of the run and kept in .cache/images/report.json ---

@dataclass
class Report:
    values: dict[str, object] = field(default_factory=dict)

    def record(self, key: str, value: object) -> None:
        self.values[key] = value


REPORT = Report()


# --- base images and pip settings ---

@dataclass
class PipSecrets:
    """pip's settings for the builds, as `--secret` arguments, plus what must never show up in a layer."""

    args: list[str]
    marker: str
    ca_bundle: Path | None


def pip_settings() -> dict[str, str]:
    """The host's pip settings that make sense inside a container (URLs, hosts, proxy, CA)."""
    settings: dict[str, str] = {}
    parser = configparser.ConfigParser()
    files = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".config/pip/pip.conf",
             Path.home() / ".pip/pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    parser.read([str(f) for f in files if f.is_file()])
    for section in ("global", "install", "download"):
        if parser.has_section(section):
            for key, value in parser.items(section):
                settings.setdefault(key, value)
    for key in ("index-url", "extra-index-url", "trusted-host", "proxy", "cert", "timeout", "retries"):
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        if os.environ.get(var) and "proxy" not in settings:
            settings["proxy"] = os.environ[var]
    return settings


# --- builds ---

@dataclass
class Build:
    tag: str
    seconds: float
    log: str


def git_revision() -> str:
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True,
                            capture_output=True)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown"


def build_image(
    dockerfile: str,
    tag: str,
    secrets: PipSecrets,
    *,
    context: Path = REPO,
    runtime_base: str = BASE_PYTHON,
    extra: Sequence[str] = (),
) -> Build:
    started = time.monotonic()
    args = [
        "build", "--format", "docker", "--layers", "--pull=never", "--network", "host",
        "-f", str(context / dockerfile), "-t", tag,
        "--build-arg", f"BASE_IMAGE={BASE_PYTHON}",
        "--build-arg", f"RUNTIME_BASE={runtime_base}",
        "--build-arg", f"REVISION={git_revision()}",
        "--build-arg", f"CREATED={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}",
        *secrets.args, *extra, str(context),
    ]
    result = podman(*args, check=False, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"build of {dockerfile} failed:\n{log[-6000:]}"
    return Build(tag=tag, seconds=round(time.monotonic() - started, 1), log=log)


def image_size_mb(tag: str) -> float:
    size = json.loads(podman("image", "inspect", tag).stdout)[0]["Size"]
    return round(size / 1e6, 1)


def image_layers(tag: str) -> list[str]:
    return json.loads(podman("image", "inspect", tag).stdout)[0]["RootFS"]["Layers"]
