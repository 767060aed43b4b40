"""Shared fixtures: a real S3 server (SeaweedFS) and a GCS emulator per session, a counting proxy per test."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator

import pytest

from tests.support.azurite import REQUIRE_ENV as REQUIRE_AZURITE
from tests.support.azurite import Azurite, Unavailable
from tests.support.gcsserver import GcsEmulator
from tests.support.hubserver import HubServer
from tests.support.proxy import CountingProxy
from tests.support.registry import Registry
from tests.support.s3server import SeaweedS3

# Test-only credentials, generated per run: never real secrets, and unique so that
# the secret-leak tests can grep every output for them.
TEST_ACCESS_KEY = "WSTEST" + secrets.token_hex(6).upper()
TEST_SECRET_KEY = "wstestsecret" + secrets.token_hex(12)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), TEST_ACCESS_KEY, TEST_SECRET_KEY)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_proxy(s3_server: SeaweedS3) -> Iterator[CountingProxy]:
    proxy = CountingProxy("127.0.0.1", s3_server.s3_port)
    yield proxy
    proxy.close()


@pytest.fixture
def bucket(s3_server: SeaweedS3) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(s3_proxy: CountingProxy) -> dict[str, str]:
    """The environment a weightsync process needs to reach the test S3 server through the proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSYNC_", "HF_"))}
    env.update({
        "AWS_ENDPOINT_URL": s3_proxy.url,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "WEIGHTSYNC_S3_ADDRESSING_STYLE": "path",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """One anonymous docker-registry (CNCF distribution) for the session; tests push to repos of their own."""
    registry = Registry(tmp_path_factory.mktemp("registry")).start()
    yield registry
    registry.stop()


@pytest.fixture
def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSYNC_", "HF_"))}


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """The local Hugging Face Hub test server (tests/support/hubserver.py), one per test."""
    server = HubServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def hub_env(hub: HubServer, clean_env: dict[str, str]) -> dict[str, str]:
    """The environment a weightsync process needs to reach the test Hub."""
    return {**clean_env, **hub.env(), "PYTHONUNBUFFERED": "1"}


# Variables that would point a gs:// source at real Google credentials or another endpoint.
GOOGLE_ENV = ("GOOGLE_", "GCE_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST", "API_ENDPOINT_OVERRIDE")


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """gcp-storage-emulator, corrected where it departs from GCS (tests/support/gcsserver.py), per session; it
    pages listings by 3 objects, so that every listing of a test model follows nextPageToken."""
    with GcsEmulator(page_size=3) as server:  # small pages: every listing of a test model is paginated
        yield server


@pytest.fixture
def gcs_proxy(gcs_server: GcsEmulator) -> Iterator[CountingProxy]:
    proxy = CountingProxy("127.0.0.1", gcs_server.port)
    yield proxy
    proxy.close()


@pytest.fixture
def gcs_bucket(gcs_server: GcsEmulator) -> str:
    return gcs_server.create_bucket()


@pytest.fixture
def gcs_env(gcs_proxy: CountingProxy, clean_env: dict[str, str]) -> dict[str, str]:
    """The environment a weightsync process needs to reach the emulator through the proxy (no credentials)."""
    env = {k: v for k, v in clean_env.items() if not k.startswith(GOOGLE_ENV)}
    return {**env, "STORAGE_EMULATOR_HOST": gcs_proxy.url, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite (Azure Blob Storage's emulator) per session; skipped where it is not installed, unless
    WS_REQUIRE_AZURITE is set (CI), where that is a failure."""
    server = Azurite(tmp_path_factory.mktemp("azurite"))
    try:
        server.start()
    except Unavailable as exc:
        if os.environ.get(REQUIRE_AZURITE):
            pytest.fail(f"{exc}, and {REQUIRE_AZURITE} is set")
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def azurite_proxy(azurite: Azurite) -> Iterator[CountingProxy]:
    proxy = CountingProxy("127.0.0.1", azurite.port)
    yield proxy
    proxy.close()


@pytest.fixture
def container(azurite: Azurite) -> str:
    name = f"models-{uuid.uuid4().hex[:12]}"
    azurite.service().create_container(name)
    return name


@pytest.fixture
def az_env(azurite: Azurite, azurite_proxy: CountingProxy, clean_env: dict[str, str]) -> dict[str, str]:
    """The environment a weightsync process needs to reach Azurite through the proxy: a connection string, as
    Azurite's users write it, and nothing else of Azure's."""
    env = {k: v for k, v in clean_env.items() if not k.startswith(("AZURE_", "IDENTITY_", "MSI_"))}
    proxied = f"{azurite_proxy.url}/{azurite.endpoint.rsplit('/', 1)[1]}"
    return {**env, "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(proxied), "PYTHONUNBUFFERED": "1"}
