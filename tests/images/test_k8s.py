"""Kubernetes manifests and the Helm chart: kustomize build of every overlay and the chart rendered
with several value sets, each validated with `kubernetes-validate --strict`, scanned with trivy
(no HIGH or CRITICAL finding), and checked for the properties the deployment docs promise."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.images.helpers import REPO, find_tool, require_tool

pytestmark = pytest.mark.slow

# Where an OCI registry's docker config.json reaches the agent (and only the agent), in the overlay and the chart.
REGISTRY_MOUNT = {"name": "registry-auth", "mountPath": "/etc/weightsync-registry", "readOnly": True}
OVERLAYS = ["cpu", "gpu", "sidecar", "prewarm", "node-cache", "hf-cache", "gcs", "azure", "oci", "mirror"]
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


def assert_no_service_links(docs: list[dict[str, Any]]) -> None:
    """Kubernetes puts <SERVICE>_SERVICE_HOST, <SERVICE>_PORT... of every Service in the namespace into each
    container unless the pod opts out: a Service named weightsync... would hand the agent WEIGHTSYNC_*
    variables, one named vllm would set VLLM_PORT for vLLM."""
    specs = pod_specs(docs)
    assert specs
    for where, spec in specs:
        assert spec.get("enableServiceLinks") is False, where


@functools.cache
def weightsync_variables(command: str = "sync") -> frozenset[str]:
    """The WEIGHTSYNC_* variables `weightsync COMMAND --help` lists: the agent refuses any other."""
    result = subprocess.run([sys.executable, "-m", "weightsync", command, "--help"], text=True,
                            capture_output=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    names = frozenset(re.findall(r"\[env\s+(WEIGHTSYNC_[A-Z0-9_]+)\]", result.stdout))
    assert {"WEIGHTSYNC_SOURCE", "WEIGHTSYNC_TO" if command == "mirror" else "WEIGHTSYNC_DEST"} <= names
    return names


def assert_weightsync_variables_are_options(docs: list[dict[str, Any]]) -> None:
    """Every WEIGHTSYNC_* a manifest sets is an option of the command that reads it (the mirror Job's own
    ConfigMap: `weightsync mirror`'s; everything else: `weightsync sync`'s)."""
    mirror = {key for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("weightsync-mirror")
              for key in d.get("data", {}) if key.startswith("WEIGHTSYNC_")}
    assert not mirror - weightsync_variables("mirror"), f"not options of weightsync mirror: {sorted(mirror)}"
    used = {key for d in docs if d["kind"] == "ConfigMap" and not d["metadata"]["name"].startswith(
        "weightsync-mirror") for key in d.get("data", {})}
    for _, spec in pod_specs(docs):
        for item in spec.get("initContainers", []) + spec["containers"]:
            used.update(var["name"] for var in item.get("env", []))
    unknown = {name for name in used if name.startswith("WEIGHTSYNC_")} - weightsync_variables()
    assert not unknown, f"not options of weightsync sync: {sorted(unknown)}"


def resolved_env(item: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """A container's env as Kubernetes resolves it: configMapKeyRef from the rendered ConfigMaps, then
    $(VAR) references to variables defined earlier in the list."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for var in item.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = configmaps[ref["name"]][ref["key"]]
        else:
            value = var.get("value", "")
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            env[var["name"]] = value
    return env


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
    assert_no_service_links(docs)
    assert_weightsync_variables_are_options(docs)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "weightsync", f"{doc['kind']}/{doc['metadata']['name']}"

    spec = find(docs, "Deployment", "example-server")["spec"]["template"]["spec"]
    server = container(spec, "server")
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in server["volumeMounts"]
    config = find(docs, "ConfigMap")["data"]
    if overlay == "hf-cache":
        # The cache layout: no name (weightsync refuses --name there); the repo id, revision and cache are set
        # once, in the ConfigMap, and the server loads the model by repo id from the cache, offline.
        assert "WEIGHTSYNC_NAME" not in config and config["WEIGHTSYNC_LAYOUT"] == "hf-cache"
        assert config["WEIGHTSYNC_DEST"] == "/models/hub" and config["WEIGHTSYNC_SOURCE"].startswith("hf://")
        env = resolved_env(server, docs)
        assert "MODEL_DIR" not in env
        assert env["HF_HUB_CACHE"] == env["HUGGINGFACE_HUB_CACHE"] == "/models/hub" and env["HF_HUB_OFFLINE"] == "1"
        assert env["MODEL_ID"] == config["WEIGHTSYNC_REPO_ID"] == "Qwen/Qwen2.5-0.5B-Instruct"
        assert env["MODEL_REVISION"] == config["WEIGHTSYNC_REVISION"]
        assert server["image"].startswith("vllm/vllm-openai:v") and server["command"] == ["vllm", "serve"]
        assert server["args"][:3] == ["$(MODEL_ID)", "--revision=$(MODEL_REVISION)", "--served-model-name=$(MODEL_ID)"]
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        model = "Qwen"
    else:
        # The model name is set once, in the ConfigMap; every pod derives its MODEL_DIR from it.
        assert config["WEIGHTSYNC_NAME"] == "tiny-mlp"
        assert resolved_env(server, docs)["MODEL_DIR"] == "/models/tiny-mlp/current"
        model = "tiny-mlp"
    for where, pod in pod_specs(docs):
        assert model not in yaml.safe_dump(pod), f"{where} names the model itself"
        for item in pod.get("initContainers", []):
            if item["name"] == "wait-for-model":
                assert resolved_env(item, docs)["MODEL_DIR"] == "/models/tiny-mlp/current", where
                assert "$MODEL_DIR" in item["args"][0], where

    if overlay in {"cpu", "gpu", "sidecar", "hf-cache", "gcs", "azure", "oci"}:
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
    if overlay == "mirror":
        # The Job fetches from the origin once into the in-cluster store; the replicas sync from the store.
        job = find(docs, "Job", "weightsync-mirror")["spec"]["template"]["spec"]
        agent = container(job, "weightsync")
        assert agent["args"] == ["mirror"]
        mirror_map = next(d for d in docs if d["kind"] == "ConfigMap"
                          and d["metadata"]["name"].startswith("weightsync-mirror"))
        assert {"configMapRef": {"name": mirror_map["metadata"]["name"]}} in agent["envFrom"]
        mirror_config = mirror_map["data"]
        assert {"secretRef": {"name": "weightsync-credentials", "optional": True}} in agent["envFrom"]
        assert mirror_config["WEIGHTSYNC_SOURCE"].startswith("hf://")
        assert mirror_config["WEIGHTSYNC_TO"] == config["WEIGHTSYNC_SOURCE"] == "s3://models/tiny-mlp"
        assert mirror_config["AWS_ENDPOINT_URL"] == config["AWS_ENDPOINT_URL"], "one in-cluster store"
        assert config["WEIGHTSYNC_FALLBACK"] == mirror_config["WEIGHTSYNC_SOURCE"], "the origin backs the store"
        assert not any(v.get("persistentVolumeClaim") for v in job["volumes"]), "it streams: no model volume"
        assert agent["resources"]["limits"]["memory"] == "1Gi"
        assert container(spec, "weightsync")["args"][0] == "sync"
    # Each cloud's workload identity: the ServiceAccount (and for AKS the pod label) carry it, no key does.
    service_account = find(docs, "ServiceAccount", "weightsync")["metadata"].get("annotations", {})
    if overlay == "gcs":
        assert config["WEIGHTSYNC_SOURCE"].startswith("gs://")
        assert service_account["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    if overlay == "azure":
        assert config["WEIGHTSYNC_SOURCE"].startswith("az://")
        assert "azure.workload.identity/client-id" in service_account
        pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["azure.workload.identity/use"] == "true"
    if overlay == "oci":
        assert config["WEIGHTSYNC_SOURCE"].startswith("oci://")
        assert config["DOCKER_CONFIG"] == REGISTRY_MOUNT["mountPath"]
        agent = container(spec, "weightsync")
        assert REGISTRY_MOUNT in agent["volumeMounts"]
        assert not any(m["name"] == "registry-auth" for m in server["volumeMounts"]), "the server never sees it"
        auth = {v["name"]: v for v in spec["volumes"]}["registry-auth"]["secret"]
        assert auth["optional"] is True and auth["items"] == [{"key": ".dockerconfigjson", "path": "config.json"}]
    if overlay == "node-cache":
        daemon = find(docs, "DaemonSet", "weightsync-node-cache")["spec"]["template"]["spec"]
        assert container(daemon, "weightsync")["args"][0] == "serve"
        assert daemon["volumes"][0]["hostPath"]["path"] == spec["volumes"][0]["hostPath"]["path"]
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


# --- Helm ----------------------------------------------------------------------------------------

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "signed-key-from-secret": yaml.safe_load((CHART / "values-signed.yaml").read_text()),
    "signed-sigstore-configmap-sidecar": {
        "weightsync": {"mode": "sidecar", "include": ["*.safetensors", "*.json"]},
        "signature": {"required": True, "ignore": ["README.md", "*.txt"], "trust": {"identity": "release@example.com",
                                                  "issuer": "https://accounts.example.com",
                                                  "root": "trust_config.json", "configMapName": "sigstore-root"}},
    },
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
            "requireChecksum": True, "rebind": True,
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
    # A server of one's own: its command and args as given, its probes, volumes for it and the agent.
    "custom-server-gpu-probes-volumes": {
        "server": {
            "image": {"repository": "registry.example.com/my-server", "tag": "1.2.3"},
            "command": ["/usr/bin/my-server"], "args": ["--model", "$(MODEL_DIR)", "--listen", ":$(PORT)"],
            "port": 9000, "healthPath": "/ready",
            "startupProbe": {"periodSeconds": 10, "failureThreshold": 360},
            "readinessProbe": None,
            "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 30},
            "extraVolumeMounts": [{"name": "cache", "mountPath": "/var/cache/my-server"}],
        },
        "weightsync": {"extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/custom", "readOnly": True}],
                       "extraEnv": [{"name": "AWS_CA_BUNDLE", "value": "/etc/ssl/custom/ca.crt"}]},
        "extraVolumes": [{"name": "cache", "emptyDir": {"sizeLimit": "5Gi"}},
                         {"name": "ca", "configMap": {"name": "corporate-ca"}}],
        "gpu": {"enabled": True},
    },
    # Mirror once per cluster: a Job fetches the origin into the in-cluster store the pods sync from.
    "mirror-from-the-hub-into-seaweedfs": {
        "weightsync": {"source": "s3://models/acme/tiny-mlp", "fallback": ["hf://acme/tiny-mlp"],
                       "s3": {"endpoint": "http://seaweedfs-s3.storage.svc:8333", "addressingStyle": "path"}},
        "mirror": {"enabled": True, "source": "hf://acme/tiny-mlp", "revision": "main"},
        "credentials": {"existingSecret": "weightsync-credentials"},
    },
    # The example values file for vLLM, as a user passes it with -f.
    "vllm": yaml.safe_load((CHART / "values-vllm.yaml").read_text()),
    # vLLM loading the model by repo id from the Hugging Face cache layout.
    "vllm-hf-cache": yaml.safe_load((CHART / "values-vllm-hf-cache.yaml").read_text()),
    # Each cloud's workload identity and a private registry, as their example values files are used with -f.
    "gcs-workload-identity": yaml.safe_load((CHART / "values-gcs-workload-identity.yaml").read_text()),
    "azure-workload-identity": yaml.safe_load((CHART / "values-azure-workload-identity.yaml").read_text()),
    "oci": yaml.safe_load((CHART / "values-oci.yaml").read_text()),
    # The cache layout for an S3 mirror (the repo id given), with weightsync as a native sidecar, pinned.
    "hf-cache-s3-mirror-sidecar": {
        "weightsync": {"layout": "hf-cache", "repoId": "acme/tiny-mlp", "mode": "sidecar",
                       "revision": "0123456789abcdef0123"},
    },
}
CHART_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())


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
    assert_no_service_links(docs)
    assert_weightsync_variables_are_options(docs)
    assert "helm test" in extra["NOTES"] or not values.get("tests", {}).get("enabled", True)

    jobs = [d for d in docs if d["kind"] == "Job"]
    if values.get("mirror", {}).get("enabled"):
        (job,) = jobs
        mirror = container(job["spec"]["template"]["spec"], "weightsync")
        assert mirror["args"][:3] == ["mirror", f"--source={values['mirror']['source']}",
                                      f"--to={values['weightsync']['source']}"]
        assert {"name": "AWS_ENDPOINT_URL", "value": values["weightsync"]["s3"]["endpoint"]} in mirror["env"]
        assert {"secretRef": {"name": "weightsync-credentials"}} in mirror["envFrom"]
        assert not any("persistentVolumeClaim" in v for v in job["spec"]["template"]["spec"]["volumes"])
    else:
        assert not jobs

    spec = find(docs, "Deployment")["spec"]["template"]["spec"]
    agent, server = container(spec, "weightsync"), container(spec, "server")
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    mode = values.get("weightsync", {}).get("mode", "init")
    assert agent["args"][0] == ("serve" if mode == "sidecar" else "sync")
    assert (agent.get("restartPolicy") == "Always") == (mode == "sidecar")
    assert {"mountPath": "/models", "name": "models", "readOnly": True} in server["volumeMounts"]
    # The server runs exactly the command and args of the values: the chart injects nothing (gpu.enabled
    # included), and Kubernetes is the one to expand $(MODEL_DIR) from the env the chart sets.
    given = {**CHART_DEFAULTS["server"], **values.get("server", {})}
    assert server.get("command", []) == given["command"] and server.get("args", []) == given["args"]
    name = values.get("weightsync", {}).get("name", CHART_DEFAULTS["weightsync"]["name"])
    env = resolved_env(server, docs)
    agent_env = resolved_env(agent, docs)
    if values.get("weightsync", {}).get("layout") == "hf-cache":
        # The server loads the model by repo id from the cache, offline; weightsync fills the cache, unnamed.
        repo_id = values["weightsync"].get("repoId") or values["weightsync"]["source"].removeprefix("hf://")
        assert "MODEL_DIR" not in env and env["MODEL_ID"] == env["MODEL_NAME"] == repo_id
        assert env["HF_HUB_CACHE"] == env["HUGGINGFACE_HUB_CACHE"] == "/models/hub" and env["HF_HUB_OFFLINE"] == "1"
        assert agent_env["WEIGHTSYNC_LAYOUT"] == "hf-cache" and agent_env["WEIGHTSYNC_REPO_ID"] == repo_id
        assert "--dest=/models/hub" in agent["args"] and not any(a.startswith("--name") for a in agent["args"])
        name = repo_id
    else:
        assert env["MODEL_DIR"] == f"/models/{name}/current" and env["MODEL_NAME"] == name
        assert "WEIGHTSYNC_LAYOUT" not in agent_env and f"--name={name}" in agent["args"]
    assert env["PORT"] == str(given["port"])
    # A startupProbe holds liveness back while the model loads.
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 300
    tests_pods = [d for d in docs if d["kind"] == "Pod"]
    if values.get("tests", {}).get("enabled", True):
        (test_pod,) = tests_pods
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        requests = json.loads(test_pod["spec"]["containers"][0]["args"][1])
        if values.get("tests", {}).get("requests"):
            assert requests == values["tests"]["requests"]
        elif given["image"]["repository"].endswith("weightsync-example"):  # the chart's pick for its own example
            assert [(r["method"], r["path"]) for r in requests] == [("GET", given["healthPath"]),
                                                                    ("POST", "/v1/predict")]
        else:  # a custom server without requests of its own: only its health path
            assert requests == [{"method": "GET", "path": given["healthPath"]}]
    else:
        assert not tests_pods
    if value_set == "defaults":
        assert find(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
        assert "args" not in server
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
        assert [r["path"] for r in requests] == ["/healthz", "/v1/predict"]
    if value_set == "sidecar-gpu-servicemonitor":
        assert crds and crds[0]["kind"] == "ServiceMonitor"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--require-gpu" in agent["args"]
        assert agent["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert "args" not in server  # no --device cuda of the chart's making
    if value_set == "custom-server-gpu-probes-volumes":
        assert server["command"] == ["/usr/bin/my-server"]
        assert server["args"] == ["--model", "$(MODEL_DIR)", "--listen", ":$(PORT)"]
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert server["startupProbe"] == {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 10,
                                          "failureThreshold": 360}
        assert "readinessProbe" not in server
        # Helm merges a probe of the values into the default one: the default's failureThreshold stays.
        assert server["livenessProbe"] == {"tcpSocket": {"port": "http"}, "periodSeconds": 30, "failureThreshold": 3}
        assert {"name": "cache", "mountPath": "/var/cache/my-server"} in server["volumeMounts"]
        assert {"name": "ca", "mountPath": "/etc/ssl/custom", "readOnly": True} in agent["volumeMounts"]
        assert {"name": "ca", "configMap": {"name": "corporate-ca"}} in spec["volumes"]
        assert requests == [{"method": "GET", "path": "/ready"}], "a custom server is not sent the example's predict"
    if value_set == "vllm":
        assert server["image"].startswith("vllm/vllm-openai:v") and server["command"] == ["vllm", "serve"]
        assert server["args"][0] == "$(MODEL_DIR)" and "--served-model-name=$(MODEL_NAME)" in server["args"]
        assert "--device" not in " ".join(server["args"])
        assert server["ports"] == [{"name": "http", "containerPort": 8000}]
        assert server["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 1800
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        # A read-only root filesystem, and a writable HOME for vLLM's caches.
        assert server["securityContext"]["readOnlyRootFilesystem"] is True
        assert "emptyDir" in volumes[mounts[env["HOME"]]] and env["HF_HUB_OFFLINE"] == "1"
        # The HF token reaches the agent only.
        assert agent["envFrom"] == [{"secretRef": {"name": "hf-token"}}] and "envFrom" not in server
        assert values["weightsync"]["source"].startswith("hf://")
        assert [(r.get("method", "GET"), r["path"]) for r in requests] == [
            ("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")]
        assert "$(MODEL_NAME)" in requests[2]["body"]
        assert {"name": "MODEL_NAME", "value": name} in test_pod["spec"]["containers"][0]["env"]
    if value_set == "vllm-hf-cache":
        assert server["image"].startswith("vllm/vllm-openai:v") and server["command"] == ["vllm", "serve"]
        assert server["args"][:3] == ["$(MODEL_ID)", "--revision=$(MODEL_REVISION)",
                                      "--served-model-name=$(MODEL_NAME)"]
        assert env["MODEL_ID"] == "Qwen/Qwen2.5-0.5B-Instruct" and env["MODEL_REVISION"] == "main"
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["vllm-home"]
        assert agent["envFrom"] == [{"secretRef": {"name": "hf-token"}}] and "envFrom" not in server
        assert "$(MODEL_NAME)" in requests[2]["body"]
        assert {"name": "MODEL_NAME", "value": name} in test_pod["spec"]["containers"][0]["env"]
    if value_set == "mirror-from-the-hub-into-seaweedfs":
        # The pods sync from the store, with the origin behind it (as the mirror overlay's ConfigMap sets it).
        assert {"--source=s3://models/acme/tiny-mlp", "--fallback=hf://acme/tiny-mlp"} <= set(agent["args"])
    if value_set == "hf-cache-s3-mirror-sidecar":
        # s3:// revisions are cached under refs/main: the server asks for main, whatever is pinned.
        assert env["MODEL_REVISION"] == "main" and "--revision=0123456789abcdef0123" in agent["args"]
    service_account = find(docs, "ServiceAccount")["metadata"].get("annotations", {})
    if value_set == "gcs-workload-identity":
        assert "--source=gs://models-bucket/tiny-mlp" in agent["args"] and "envFrom" not in agent
        assert service_account["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    if value_set == "azure-workload-identity":
        assert "--source=az://modelsaccount/models/tiny-mlp" in agent["args"] and "envFrom" not in agent
        assert "azure.workload.identity/client-id" in service_account
        pod_labels = find(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["azure.workload.identity/use"] == "true"
    if value_set == "oci":
        assert any(a.startswith("--source=oci://") and "@sha256:" in a for a in agent["args"])
        assert agent_env["DOCKER_CONFIG"] == "/etc/weightsync-registry" and "DOCKER_CONFIG" not in env
        assert REGISTRY_MOUNT in agent["volumeMounts"]
        assert not any(m["name"] == "registry-auth" for m in server["volumeMounts"]), "the server never sees it"
        auth = {v["name"]: v for v in spec["volumes"]}["registry-auth"]["secret"]
        assert auth == {"secretName": "registry-auth", "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
    if value_set == "rwx-existing-claim-lockfile-push":
        assert claim == "shared-models" and not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert "--lockfile=/etc/weightsync/weightsync.lock" in agent["args"]
        assert "--require-checksum" in agent["args"] and "--rebind" in agent["args"]
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
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"server": {"startupProbe": {"periodSecond": 10}}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"server": {"extraVolumeMounts": [{"name": "dshm"}]}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"extraVolumes": [{"emptyDir": {}}]})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"tests": {"requests": [{"method": "GET", "path": "health"}]}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"tests": {"predictBody": "{}"}})
        with pytest.raises(helm.HelmError, match="sidecar"):
            chart.render(values={"metrics": {"serviceMonitor": {"enabled": True}}}, name="demo")
        with pytest.raises(helm.HelmError, match="ReadWriteMany"):
            chart.render(values={"replicaCount": 2}, name="demo")
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"weightsync": {"layout": "hub"}})
        with pytest.raises(helm.HelmError):
            chart.validate_schema({"weightsync": {"layout": "hf-cache", "repoId": "acme--x/y"}})
        with pytest.raises(helm.HelmError, match="s3:// URI"):  # the mirror's target is the pods' source
            chart.render(values={"mirror": {"enabled": True, "source": "hf://a/b"},
                                 "weightsync": {"source": "hf://a/b"}}, name="demo")
        with pytest.raises(helm.HelmError, match=r"mirror\.source"):
            chart.render(values={"mirror": {"enabled": True}}, name="demo")
        with pytest.raises(helm.HelmError, match="repoId"):  # an s3:// source has no repo id of its own
            chart.render(values={"weightsync": {"layout": "hf-cache"}}, name="demo")


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
