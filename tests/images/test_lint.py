"""Static checks of the Dockerfiles, lock files and Compose file: hadolint, trivy, pins, profiles."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.images.helpers import REPO, require_tool

pytestmark = pytest.mark.slow

DOCKERFILES = [REPO / "docker/Dockerfile", REPO / "docker/example-server/Dockerfile"]
LOCKS = REPO / "docker/requirements"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "style", str(dockerfile)], text=True,
                            capture_output=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def trivy_config(target: Path, *extra: str) -> dict:
    trivy = require_tool("trivy")
    result = subprocess.run(
        [trivy, "config", "--skip-check-update", "--quiet", "--format", "json", *extra, str(target)],
        text=True, capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def findings(report: dict, severities: set[str]) -> list[str]:
    return [
        f"{r['Target']}: {m['ID']} ({m['Severity']}) {m['Title']}"
        for r in report.get("Results", []) or []
        for m in r.get("Misconfigurations", []) or []
        if m.get("Status", "FAIL") == "FAIL" and m["Severity"] in severities
    ]


def test_trivy_finds_nothing_in_the_dockerfiles() -> None:
    report = trivy_config(REPO / "docker")
    targets = {r["Target"] for r in report.get("Results", []) or []}
    assert {"Dockerfile", "example-server/Dockerfile"} <= targets, targets
    assert findings(report, {"LOW", "MEDIUM", "HIGH", "CRITICAL"}) == []


def test_base_images_are_pinned_by_digest() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for arg in ("BASE_IMAGE", "RUNTIME_BASE"):
            match = re.search(rf"^ARG {arg}=(\S+)$", text, re.M)
            assert match and re.search(r"@sha256:[0-9a-f]{64}$", match.group(1)), f"{dockerfile}: {arg}"
        assert "# syntax=docker/dockerfile:1" in text  # BuildKit features: cache, secret and bind mounts
        assert "--mount=type=secret,id=pip.conf" in text and "--mount=type=cache" in text
        assert "USER 10001:10001" in text


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]).lower() for r in requirements}


def test_lock_files_pin_every_dependency_with_hashes() -> None:
    """Regenerate with the command in docs/deploy.md when pyproject.toml or requirements.txt change."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    server = [line.strip() for line in (REPO / "docker/example-server/requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    agent_lock, server_lock = lock_pins(LOCKS / "agent.lock"), lock_pins(LOCKS / "example-server.lock")
    assert requirement_names(project) <= set(agent_lock), "agent.lock is stale"
    assert requirement_names(project + server) <= set(server_lock), "example-server.lock is stale"
    for line in server:  # the server's own pins win
        name, _, version = line.partition("==")
        if version:
            assert server_lock[re.sub(r"[-_.]+", "-", name).lower()] == version.split(";")[0].strip(), line
    for lock in LOCKS.glob("*.lock"):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
        for block in blocks:
            if re.match(r"^[A-Za-z0-9_.-]+==", block):
                assert "--hash=sha256:" in block, f"{lock.name}: no hash for {block.splitlines()[0]}"


def compose_config(*profiles: str) -> dict:
    tool = require_tool("podman-compose")
    args = [tool, "-f", str(REPO / "docker/compose.yaml")]
    for profile in profiles:
        args += ["--profile", profile]
    result = subprocess.run([*args, "config"], text=True, capture_output=True, timeout=60,
                            cwd=REPO / "docker", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_profiles() -> None:
    raw = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    assert {"models"} <= set(raw["volumes"])
    cpu = compose_config("cpu")
    assert set(cpu["services"]) == {"server-cpu"}
    gpu = compose_config("gpu")
    assert set(gpu["services"]) == {"server-gpu"}
    devices = gpu["services"]["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    build_args = gpu["services"]["server-gpu"]["build"]["args"]
    assert any(str(a).startswith("RUNTIME_BASE=nvidia/cuda:") for a in build_args) or "nvidia/cuda" in str(
        dict(build_args).get("RUNTIME_BASE", "") if isinstance(build_args, dict) else ""), build_args
    local = compose_config("s3", "cpu")
    assert {"s3", "s3-seed", "server-cpu"} <= set(local["services"])
    for config in (cpu, gpu, local):
        for name, service in config["services"].items():
            if name.startswith("server"):
                assert any(str(v).endswith(":/models") for v in service["volumes"]) or any(
                    isinstance(v, dict) and v.get("target") == "/models" for v in service["volumes"]), name
                assert service.get("read_only") and "ALL" in service.get("cap_drop", [])


def test_compose_takes_credentials_only_from_the_environment() -> None:
    text = (REPO / "docker/compose.yaml").read_text()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "AWS_SESSION_TOKEN"):
        for match in re.finditer(rf"^\s*{key}:\s*(.*)$", text, re.M):
            assert match.group(1).startswith("${"), f"{key} must come from the environment: {match.group(0)}"
    ignored = (REPO / ".gitignore").read_text().split()
    assert "docker/.env" in ignored or ".env" in ignored
