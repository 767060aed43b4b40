"""Every source honours HTTP_PROXY / HTTPS_PROXY / NO_PROXY, through a real forward proxy (Debian's tinyproxy).

Corporate egress proxies, and Dragonfly's dfdaemon as a node-local P2P proxy, carry a cluster's downloads only
if every request goes where the environment says: the listing or manifest, the ranged GETs, the Hub's redirect
to its CDN, a registry's token. Each backend runs against its real test server on loopback, the plain-http ones
through absolute-URL requests and the TLS one through a CONNECT tunnel; the proxy's own log must name the
server, and with NO_PROXY naming loopback the same sync must not touch the proxy at all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.helpers import tree_bytes, weightsync
from tests.support.tinyproxy import tinyproxy as running_tinyproxy

MODEL = {"config.json": b'{"model_type": "tiny"}', "model.safetensors": random.Random(17).randbytes(300_000)}


class Served(NamedTuple):
    uri: str
    env: dict[str, str]
    ports: tuple[int, ...]  # the servers the requests must reach through the proxy
    files: dict[str, bytes]


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    server, bucket, env = (request.getfixturevalue(name) for name in ("s3_server", "bucket", "s3_env"))
    client = server.client()
    for name, data in MODEL.items():
        client.put_object(Bucket=bucket, Key=f"proxy/{name}", Body=data)
    port = int(server.endpoint.rsplit(":", 1)[1])
    return Served(f"s3://{bucket}/proxy", {**env, "AWS_ENDPOINT_URL": server.endpoint}, (port,), MODEL)


def _hf(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    hub, env = request.getfixturevalue("hub"), request.getfixturevalue("hub_env")
    hub.add_commit("acme/proxy", MODEL)  # the shard is served by a 302 to the CDN origin: both through the proxy
    return Served("hf://acme/proxy", env, (int(hub.url.rsplit(":", 1)[1]),), MODEL)


def _gs(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    server, bucket, env = (request.getfixturevalue(name) for name in ("gcs_server", "gcs_bucket", "gcs_env"))
    for name, data in MODEL.items():
        server.upload(bucket, f"proxy/{name}", data)
    return Served(f"gs://{bucket}/proxy", {**env, "STORAGE_EMULATOR_HOST": server.url}, (server.port,), MODEL)


def _az(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    azurite, container, env = (request.getfixturevalue(name) for name in ("azurite", "container", "az_env"))
    client = azurite.service().get_container_client(container)
    for name, data in MODEL.items():
        client.upload_blob(f"proxy/{name}", data)
    env = {**env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string()}  # Azurite itself, not its counter
    return Served(f"az://devstoreaccount1/{container}/proxy", env, (azurite.port,), MODEL)


def _oci(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    registry, env = request.getfixturevalue("oci_registry"), request.getfixturevalue("clean_env")
    registry.push("acme/proxy:v1", MODEL)
    env = {**env, "DOCKER_CONFIG": str(tmp_path / "docker")}
    return Served(f"oci://{registry.host}/acme/proxy:v1", env, (registry.port,), MODEL)


def _https(request: pytest.FixtureRequest, tmp_path: Path) -> Served:
    from tests.support.httpserver import HttpServer, private_ca

    ca, context = private_ca(tmp_path / "tls")
    server = HttpServer(tls=context).__enter__()
    request.addfinalizer(server.stop)
    data = MODEL["model.safetensors"]
    server.put("/m/model.safetensors", data)
    env = {k: v for k, v in request.getfixturevalue("clean_env").items() if k not in ("REQUESTS_CA_BUNDLE",)}
    uri = f"{server.url}/m/model.safetensors#sha256={hashlib.sha256(data).hexdigest()}"
    return Served(uri, {**env, "SSL_CERT_FILE": str(ca)}, (server.port,), {"model.safetensors": data})


SOURCES: dict[str, Callable[[pytest.FixtureRequest, Path], Served]] = {
    "s3": _s3, "hf": _hf, "gs": _gs, "az": _az, "oci": _oci, "https": _https}


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with running_tinyproxy(tmp_path) as proxy:
        yield proxy


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_goes_through_the_forward_proxy_and_no_proxy_exempts_it(kind, request, tinyproxy, tmp_path):
    served = SOURCES[kind](request, tmp_path)
    proxy, log = tinyproxy
    # NO_PROXY empty: loopback is not exempt unless the user says so (urllib's rule, which the sources follow).
    env = {**served.env, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
           "NO_PROXY": "", "no_proxy": ""}
    result = weightsync("sync", "--source", served.uri, "--dest", str(tmp_path / "vol"), env=env)
    assert result.returncode == 0, result.stderr
    assert tree_bytes(Path(result.stdout.splitlines()[-1])) == served.files
    seen = log.read_text()
    for port in served.ports:
        assert f":{port}" in seen, f"{kind}: nothing reached port {port} through the proxy:\n{seen}"

    exempt = {**env, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    bypass = weightsync("sync", "--source", served.uri, "--dest", str(tmp_path / "vol2"), env=exempt)
    assert bypass.returncode == 0, bypass.stderr
    assert log.read_text() == seen, f"{kind}: NO_PROXY names loopback, yet the proxy was used"
