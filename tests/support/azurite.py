"""A real Azure Blob Storage server for tests: Azurite (Microsoft's emulator, npm package `azurite`) on loopback.

Install: `npm install --prefix .cache/azurite azurite@3.35.0` (what .ci/run should do; found there, on PATH as
`azurite-blob`, or in AZURITE_BLOB). Where it is missing, `start()` raises `Unavailable` and the fixtures skip, or
fail when `WS_REQUIRE_AZURITE=1` (CI sets it, so a broken install cannot hide behind a skip).

Azurite listens on a free port, path-style (`http://127.0.0.1:PORT/devstoreaccount1/container/blob`, as a
connection string's BlobEndpoint names it), with the development account's name but a key generated per run
(AZURITE_ACCOUNTS), so that the secret-leak tests can grep every output for it.

What Azurite 3.35 does where it parts from Azure (checked by tests/test_azure_sync.py, which asserts each before
relying on it; nothing in weightsync/sources/azure.py depends on them):
- Put Blob (a single-shot upload) gets a Content-MD5 computed by the server, as Azure does; Put Block List does
  not, unless the client sent x-ms-blob-content-md5 (azcopy --put-md5, azure-storage-blob's content_settings), as
  Azure does. So "what has an MD5" is the same as on Azure for the uploads tested.
- GET with If-Match on an old ETag answers 412 ConditionNotMet, as Azure does; x-ms-range is honoured (206 with
  Content-Range).
- OAuth bearer tokens are accepted only with `--oauth basic` over HTTPS, and then Azurite checks the JWT's issuer,
  audience and expiry but not its signature (its README says so; `Azurite(tls=...)` runs it that way): a
  bearer-token test against it proves the token is asked for storage and sent as Azure expects, and that a token
  for another audience is refused, not that a real token would be valid.
- A wrong account key or SAS signature is 403 `AuthorizationFailure`; Azure says `AuthenticationFailed`. Both are
  403, which is all weightsync goes by.
- There is no hierarchical namespace (ADLS Gen2): `hdi_isfolder` markers are plain blobs with that metadata.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.s3server import free_port

REQUIRE_ENV = "WS_REQUIRE_AZURITE"
ACCOUNT = "devstoreaccount1"
ROOT = Path(__file__).resolve().parent.parent.parent


class Unavailable(RuntimeError):
    """Azurite cannot run on this machine (the message says why)."""


def azurite_binary() -> str | None:
    """`azurite-blob` from AZURITE_BLOB, the repo's npm cache (.cache/azurite), or PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB", ""), str(ROOT / ".cache/azurite/node_modules/.bin/azurite-blob")):
        if candidate and Path(candidate).exists():
            return candidate
    return shutil.which("azurite-blob")


class Azurite:
    """`azurite-blob` on a free loopback port, its data in `data_dir`; `endpoint` once `start()` returns."""

    def __init__(self, data_dir: Path, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: (certificate, key) PEM files to serve HTTPS with, and accept OAuth bearer tokens (`--oauth basic`,
        which Azurite allows over HTTPS only)."""
        import base64
        import secrets

        self.data_dir = Path(data_dir)
        self.tls = tls
        self.key = base64.b64encode(b"wstest" + secrets.token_bytes(58)).decode()
        self.port = free_port()
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/{ACCOUNT}"
        self.process: subprocess.Popen[bytes] | None = None

    def connection_string(self, endpoint: str | None = None, key: str | None = None) -> str:
        """The connection string a user of Azurite writes (BlobEndpoint path-style), optionally via a proxy URL."""
        return (f"DefaultEndpointsProtocol={'https' if self.tls else 'http'};AccountName={ACCOUNT};"
                f"AccountKey={key or self.key};"
                f"BlobEndpoint={endpoint or self.endpoint};")

    def start(self, timeout: float = 30.0) -> Azurite:
        binary = azurite_binary()
        if binary is None:
            raise Unavailable("azurite-blob is not installed (npm install --prefix .cache/azurite azurite@3.35.0)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "azurite.log", "wb")  # noqa: SIM115 - lives as long as the server
        tls = ["--oauth", "basic", "--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else []
        self.process = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", str(self.data_dir),
             "--silent", "--skipApiVersionCheck", "--disableTelemetry", *tls],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{self.key}"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"azurite-blob exited early; see {self.data_dir / 'azurite.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                self.service().get_service_properties()
                return self
            except Exception:  # still coming up
                time.sleep(0.2)
        self.stop()
        raise Unavailable(f"azurite-blob not ready after {timeout}s")

    def service(self, endpoint: str | None = None, **options: object):
        """azure-storage-blob's client, as a user uploading a model builds it."""
        from azure.storage.blob import BlobServiceClient

        if self.tls:
            options.setdefault("connection_verify", str(self.tls[0]))
        return BlobServiceClient.from_connection_string(self.connection_string(endpoint), **options)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
