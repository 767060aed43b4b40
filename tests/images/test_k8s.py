"""Kubernetes manifests and the Helm chart: kustomize build of every overlay and the chart rendered
with several value sets, each validated with `kubernetes-validate --strict`, scanned with trivy
(no HIGH or CRITICAL finding), and checked for the properties the deployment docs promise."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.images.helpers import REPO, find_tool, require_tool

pytestmark = pytest.mark.slow

OVERLAYS = ["cpu", "gpu", "sidecar", "prewarm", "node-cache"]
CHART = REPO / "charts/weightsync"
# The oldest release with native sidecars (restartPolicy: Always initContainers), and the newest schema.
KUBE_VERSIONS = ["1.29", None]


def kustomize(path: Path) -> str:
    kubectl = find_tool("kubectl")
    command = [kubectl, "kustomize", str(path)] if kubectl else [require_tool("kustomize"), "build", str(path)]
    result = subprocess.run(command, text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate(manifests: str, tmp_path: Path, name: str) -> None:
    tool = require_tool("kubernetes-validate")
    path = tmp_path / f"{name}.yaml"
    path.write_text(manifests)
    for version in KUBE_VERSIONS:
        args = [tool, "--strict", "--quiet", *(["-k", version] if version else []), str(path)]
        result = subprocess.run(args, text=True, capture_output=True, timeout=300)
        assert result.returncode == 0, f"{name} (Kubernetes {version or 'latest'}):\n{result.stdout}{result.stderr}"


def trivy_high(manifests: str, tmp_path: Path, name: str) -> list[str]:
    trivy = require_tool("trivy")
    directory = tmp_path / f"trivy-{name}"
    directory.mkdir()
    (directory / f"{name}.yaml").write_text(manifests)
    result = subprocess.run(
        [trivy, "config", "--skip-check-update", "--quiet", "--format", "json", "--severity", "HIGH,CRITICAL",
         str(directory)], text=True, capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return [
        f"{m['ID']} {m['Title']}: {m.get('Message', '')}"
        for r in report.get("Results", []) or []
        for m in r.get("Misconfigurations", []) or []
        if m.get("Status", "FAIL") == "FAIL"
    ]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for doc in docs:
        kind = doc["kind"]
        if kind in {"Deployment", "DaemonSet", "Job", "StatefulSet"}:
            specs.append((f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif kind == "Pod":
            specs.append((f"Pod/{doc['metadata']['name']}", doc["spec"]))
    return specs


# Containers allowed to deviate from the restricted profile, and why (see docs/deploy.md).
ROOT_ALLOWED = {"chown-cache"}  # node-cache: hands the root-owned hostPath to uid 10001, CHOWN only


def assert_hardened(docs: list[dict[str, Any]]) -> None:
    for where, spec in pod_specs(docs):
        pod = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container.get("securityContext", {})
            label = f"{where} {container['name']}"
            assert ctx.get("allowPrivilegeEscalation") is False, label
            assert ctx.get("readOnlyRootFilesystem") is True, label
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], label
            seccomp = ctx.get("seccompProfile") or pod.get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, label
            assert "resources" in container and container["resources"].get("limits"), label
            assert not ctx.get("privileged"), label
            if container["name"] not in ROOT_ALLOWED:
                assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, label
                assert ctx.get("capabilities", {}).get("add") in (None, []), label
            assert ":latest" not in container["image"] and ":" in container["image"], label


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''} in the output")


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for item in spec.get("initContainers", []) + spec["containers"]:
        if item["name"] == name:
            return item
    raise AssertionError(f"no container {name}")


# --- kustomize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_overlay_is_valid_hardened_and_scanner_clean(overlay: str, tmp_path: Path) -> None:
    manifests = kustomize(REPO / "k8s/overlays" / overlay)
    validate(manifests, tmp_path, overlay)
    assert trivy_high(manifests, tmp_path, overlay) == []
    docs = documents(manifests)
    assert_hardened(docs)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "weightsync", f"{doc['kind']}/{doc['metadata']['name']}"

    spec = find(docs, "Deployment", "example-server")["spec"]["template"]["spec"]
    server = container(spec, "server")
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in server["volumeMounts"]
    assert {"name": "MODEL_DIR", "value": "/models/tiny-mlp/current"} in server["env"]

    if overlay in {"cpu", "gpu", "sidecar"}:
        agent = container(spec, "weightsync")
        assert agent["image"].startswith("weightsync:")
        assert any(m["mountPath"] == "/models" and not m.get("readOnly") for m in agent["volumeMounts"])
        refs = agent["envFrom"]
        assert {"secretRef": {"name": "weightsync-credentials", "optional": True}} in refs
        assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    if overlay == "gpu":
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert server["image"].endswith("-cuda") and server["args"] == ["--device", "cuda"]
    if overlay == "sidecar":
        agent = container(spec, "weightsync")
        assert agent["restartPolicy"] == "Always" and agent["args"][0] == "serve"
        assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
    if overlay == "prewarm":
        job = find(docs, "Job", "weightsync-prewarm")["spec"]["template"]["spec"]
        assert container(job, "weightsync")["args"][0] == "sync"
        assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
        assert find(docs, "Deployment")["spec"]["replicas"] > 1
    if overlay == "node-cache":
        daemon = find(docs, "DaemonSet", "weightsync-node-cache")["spec"]["template"]["spec"]
        assert container(daemon, "weightsync")["args"][0] == "serve"
        assert daemon["volumes"][0]["hostPath"]["path"] == spec["volumes"][0]["hostPath"]["path"]
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


# --- Helm ----------------------------------------------------------------------------------------

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "sidecar-gpu-servicemonitor": {
        "weightsync": {"mode": "sidecar", "revision": "main", "include": ["*.safetensors", "*.json"]},
        "server": {"image": {"repository": "registry.example.com/weightsync-example", "tag": "0.1.0-cuda"}},
        "gpu": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/r"}},
    },
    "rwx-existing-claim-lockfile-push": {
        "replicaCount": 3,
        "persistence": {"existingClaim": "shared-models", "accessMode": "ReadWriteMany"},
        "weightsync": {
            "source": "hf://org/model@main", "lockfile": '{"version": 1}\n', "offline": False,
            "requireChecksum": True,
            "hf": {"endpoint": "https://hf-mirror.internal"}, "extraArgs": ["--debug"],
        },
        "credentials": {"existingSecret": "hf-token"},
        "metrics": {"pushgateway": {"url": "http://pushgateway.monitoring:9091"}},
    },
    "new-rwx-pvc-s3-compatible-textfile": {
        "persistence": {"accessMode": "ReadWriteMany", "size": "100Gi", "storageClassName": "efs"},
        "weightsync": {"s3": {"endpoint": "http://minio.storage:9000", "addressingStyle": "path",
                              "region": "eu-west-1"}},
        "credentials": {"create": True, "awsAccessKeyId": "AKIAEXAMPLE", "awsSecretAccessKey": "example"},
        "metrics": {"textfile": {"enabled": True}},
        "tests": {"enabled": False},
    },
}


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except ImportError:
        require_tool("helm-python-sdk (python module helm_python)")
    return helm_python


def render(helm, values: dict[str, Any]) -> tuple[str, dict[str, str]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values=values, name="demo", namespace="models", is_install=True)
    notes = rendered.pop("weightsync/templates/NOTES.txt", "")
    manifests = "\n---\n".join(v for v in rendered.values() if v.strip())
    return manifests, {"NOTES": notes}


def test_helm_lint_strict(helm) -> None:
    for name, values in VALUE_SETS.items():
        result = helm.lint(str(CHART), values or None, strict=True, kube_version="v1.30.0")
        problems = [m for m in result["messages"] if m["severity"] >= 2] + result.get("errors", [])
        assert not problems, f"{name}: {problems}"
    assert (CHART / "values.schema.json").is_file() and (CHART / "templates/NOTES.txt").is_file()
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["apiVersion"] == "v2"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_rendering_is_valid_hardened_and_scanner_clean(helm, value_set: str, tmp_path: Path) -> None:
    values = VALUE_SETS[value_set]
    manifests, extra = render(helm, values)
    docs = documents(manifests)
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    core = "\n---\n".join(yaml.safe_dump(d) for d in docs if d not in crds)
    validate(core, tmp_path, value_set)
    assert trivy_high(manifests, tmp_path, value_set) == []
    assert_hardened(docs)
    assert "helm test" in extra["NOTES"] or not values.get("tests", {}).get("enabled", True)

    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    agent, server = container(spec, "weightsync"), container(spec, "server")
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    mode = values.get("weightsync", {}).get("mode", "init")
    assert agent["args"][0] == ("serve" if mode == "sidecar" else "sync")
    assert (agent.get("restartPolicy") == "Always") == (mode == "sidecar")
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in server["volumeMounts"]
    if value_set == "defaults":
        assert find(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
        test_pod = find(docs, "Pod")
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    if value_set == "sidecar-gpu-servicemonitor":
        assert crds and crds[0]["kind"] == "ServiceMonitor"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--require-gpu" in agent["args"]
        assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
    if value_set == "rwx-existing-claim-lockfile-push":
        assert claim == "shared-models" and not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert "--lockfile=/etc/weightsync/weightsync.lock" in agent["args"]
        assert "--require-checksum" in agent["args"]
        assert any(a.startswith("--pushgateway=") for a in agent["args"])
        assert agent["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
        assert "strategy" not in find(docs, "Deployment")["spec"]  # RWX: rolling updates are fine
    if value_set == "new-rwx-pvc-s3-compatible-textfile":
        assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
        assert find(docs, "Secret")["type"] == "Opaque"
        assert any(a.startswith("--metrics-textfile=") for a in agent["args"])


def test_helm_rejects_inconsistent_values(helm) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"weightsync": {"mode": "daemon"}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"persistence": {"accessMode": "ReadWriteAlways"}})
        with pytest.raises(helm.HelmError, match="sidecar"):
            chart.render(values={"metrics": {"serviceMonitor": {"enabled": True}}}, name="demo")
        with pytest.raises(helm.HelmError, match="ReadWriteMany"):
            chart.render(values={"replicaCount": 2}, name="demo")


def test_trivy_scans_the_chart_itself(tmp_path: Path) -> None:
    """trivy's own Helm scanner (it renders the chart with its defaults)."""
    trivy = require_tool("trivy")
    copy = tmp_path / "weightsync"
    shutil.copytree(CHART, copy)
    result = subprocess.run(
        [trivy, "config", "--skip-check-update", "--quiet", "--format", "json", "--severity", "HIGH,CRITICAL",
         str(copy)], text=True, capture_output=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    failures = [m["ID"] for r in json.loads(result.stdout).get("Results", []) or []
                for m in r.get("Misconfigurations", []) or [] if m.get("Status", "FAIL") == "FAIL"]
    assert failures == []
