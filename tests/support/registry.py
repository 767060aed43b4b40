"""A real OCI registry on loopback: Debian's `docker-registry` (CNCF distribution 2.8), filesystem storage in tmp.

`Registry(root)` runs `docker-registry serve` on a free port, anonymous, with htpasswd (Basic) auth, or with
distribution's `auth: token` behind `TokenServer`, a loopback token service that mints JWTs signed by a test
key whose self-signed certificate is the registry's `rootcertbundle` (the path Docker Hub, GHCR, Harbor and ECR
all use: a 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`, then a token from the realm).
`push` pushes files with the ORAS Python SDK as `oras push registry/repo:tag file ...` does (each file one
layer titled by its path, mediaType `application/vnd.oci.image.layer.v1.tar`); `put_blob` / `put_manifest` push
hand-built manifests (ModelPack, archives, hostile titles, indexes) over the plain API.

Without the binary the fixtures skip, unless WS_REQUIRE_REGISTRY=1 (CI), where that is a failure.

Where distribution 2.8 differs from the big registries (seen here, relied on by the tests):
- A tag in a repository that was never pushed answers 404 MANIFEST_UNKNOWN (the tag in its detail), not
  NAME_UNKNOWN; Docker Hub and GHCR answer an anonymous client 401 UNAUTHORIZED for a repository that does not
  exist or is private (known from their behaviour, not tested here), which is why weightsync's access-denied
  line says the repository may not exist.
- Filesystem storage serves blobs itself (206 to a Range); registries backed by S3/GCS (ECR, Docker Hub, GHCR)
  answer 307 to a presigned URL on another host instead. `Registry(s3=...)` does that too, with the session's
  SeaweedFS as its storage (distribution's s3 driver, path style because `regionendpoint` is set); its
  aws-sdk-go panics at start on an AWS_CA_BUNDLE in the environment, so the registry runs without AWS_*.
- Under token auth every request needs a token, /v2/ included; Docker Hub and GHCR hand anonymous pull tokens
  for public repos, which is what `TokenServer(anonymous_pull=True)` does.
- It rejects the `application/vnd.oci.artifact.manifest.v1+json` of the OCI 1.1 release candidates (400
  MANIFEST_INVALID; the final 1.1 dropped it), keeps an image manifest's `artifactType` as it is, and has no
  referrers API (404), which newer registries (Harbor 2.8+, ECR) serve; weightsync reads neither.
- (Of the SDK, not the registry:) oras-py 0.2.43 against the htpasswd registry hung in push (not chased), so the
  registries with auth get their artifacts through `push_manifest_of`, the same manifest shape over the plain API.
- ORAS's Python SDK titles a layer with the file's basename (the Go CLI keeps the relative path), so `push`
  passes the relative path as the title through an annotation file, which is what `oras push dir/f` writes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.proxy import CountingProxy

REQUIRE_ENV = "WS_REQUIRE_REGISTRY"
BINARY = "docker-registry"
SERVICE = "weightsync-test-registry"
ISSUER = "weightsync-test-token-issuer"


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """distribution's token auth, the way Docker Hub's auth.docker.io works: GET /token?service=&scope= with
    optional Basic credentials answers {"token", "expires_in"}; a JWT signed by a test RSA key (x5c header)."""

    def __init__(self, root: Path, users: dict[str, str], anonymous_pull: bool = False, expires_in: int = 300):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users, self.anonymous_pull, self.expires_in = users, anonymous_pull, expires_in
        self.requests: list[dict[str, str]] = []
        self.minted: list[str] = []
        self.refresh_tokens: dict[str, str] = {}  # identity token -> user, for the POST grant
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightsync test token signer")])
        now = time.time()
        import datetime

        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(datetime.datetime.fromtimestamp(now - 3600, datetime.UTC))
                      .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
                      .sign(self._key, hashes.SHA256()))
        self.cert_path = root / "token-signer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._der = self._cert.public_bytes(serialization.Encoding.DER)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                user = server.check(self.headers.get("Authorization", ""))
                server.requests.append({"user": user or "", **query})
                if user is None:
                    self._reply(401, {"details": "bad credentials"})
                    return
                actions = ["pull", "push"] if user else (["pull"] if server.anonymous_pull else [])
                self._reply(200, {"token": server.mint(query.get("scope", ""), actions, user),
                                  "expires_in": server.expires_in})

            def do_POST(self) -> None:  # the OAuth2 refresh-token grant docker makes with an identity token
                length = int(self.headers.get("Content-Length", "0") or 0)
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                user = server.refresh_tokens.get(form.get("refresh_token", ""))
                server.requests.append({"user": user or "", "grant_type": form.get("grant_type", ""),
                                        **{k: form.get(k, "") for k in ("service", "scope")}})
                if form.get("grant_type") != "refresh_token" or user is None:
                    self._reply(401, {"details": "bad refresh token"})
                    return
                self._reply(200, {"access_token": server.mint(form.get("scope", ""), ["pull", "push"], user),
                                  "expires_in": server.expires_in})

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._http.server_address[1]}/token"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def check(self, authorization: str) -> str | None:
        """The user a request authenticates as: '' anonymous, None for wrong credentials."""
        if not authorization:
            return ""
        if not authorization.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def mint(self, scope: str, actions: list[str], subject: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for item in scope.split(" "):
            parts = item.split(":")
            if len(parts) == 3 and parts[0] == "repository" and actions:
                wanted = [a for a in parts[2].split(",") if a in actions]
                access.append({"type": "repository", "name": parts[1], "actions": wanted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + self.expires_in, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.minted.append(f"{signing_input}.{_b64url(signature)}")
        return self.minted[-1]

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class Registry:
    """`docker-registry serve` on a free loopback port; `host` is what an oci:// URI names."""

    def __init__(self, root: Path, *, htpasswd: dict[str, str] | None = None, token: TokenServer | None = None,
                 s3: dict[str, str] | None = None):
        self.root, self.port = root, free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.users = htpasswd or {}
        self.token = token
        self.s3 = s3  # endpoint, bucket, accesskey, secretkey: blobs in S3, GETs answered by a presigned redirect
        self._process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        lines = ["version: 0.1", "log:", "  level: warn", "storage:", "  delete:", "    enabled: true"]
        if self.s3:
            lines += ["  s3:", "    region: us-east-1", f"    regionendpoint: {self.s3['endpoint']}",
                      f"    bucket: {self.s3['bucket']}", f"    accesskey: {self.s3['accesskey']}",
                      f"    secretkey: {self.s3['secretkey']}", "    secure: false", "    v4auth: true"]
        else:
            lines += ["  filesystem:", f"    rootdirectory: {self.root / 'data'}"]
        lines += ["http:", f"  addr: 127.0.0.1:{self.port}"]
        if self.users:
            entries = [subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True,
                                      check=True).stdout.strip() for user, password in self.users.items()]
            (self.root / "htpasswd").write_text("\n".join(entries) + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: weightsync-test", f"    path: {self.root / 'htpasswd'}"]
        if self.token:
            lines += ["auth:", "  token:", f"    realm: {self.token.realm}", f"    service: {SERVICE}",
                      f"    issuer: {ISSUER}", f"    rootcertbundle: {self.token.cert_path}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        if not shutil.which(BINARY):
            skip_or_fail(f"{BINARY} is not installed (apt-get install docker-registry)")
        if self.users and not shutil.which("htpasswd"):
            skip_or_fail("htpasswd is not installed (apt-get install apache2-utils)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(self._config())
        log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - the process owns it until stop()
        # Not the AWS_* of the test machine: aws-sdk-go's AWS_CA_BUNDLE handling panics with distribution's transport.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._process = subprocess.Popen([BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _, _ = self.request("GET", "/v2/", anonymous=True)
                if status in (200, 401):
                    return self
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{BINARY} did not start: {(self.root / 'registry.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)

    # -- plain API, as an admin ---------------------------------------------------------------------------------
    def _admin(self, scope: str) -> dict[str, str]:
        if self.users:
            user, password = next(iter(self.users.items()))
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        if self.token:
            return {"Authorization": "Bearer " + self.token.mint(scope, ["pull", "push"], "admin")}
        return {}

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                anonymous: bool = False, scope: str = "") -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = {**({} if anonymous else self._admin(scope)), **(headers or {})}
            connection.request(method, path, body=body or None, headers=sent)
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def put_blob(self, repo: str, data: bytes) -> dict[str, Any]:
        """Upload one blob (POST, then PUT with its digest); its descriptor, without mediaType."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        scope = f"repository:{repo}:pull,push"
        status, headers, reply = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope)
        assert status == 202, (status, reply)
        location = urllib.parse.urlsplit(headers["location"])
        target = f"{location.path}?{location.query}&digest={urllib.parse.quote(digest)}"
        status, _, reply = self.request("PUT", target, data, {"Content-Type": "application/octet-stream"},
                                        scope=scope)
        assert status == 201, (status, reply)
        return {"digest": digest, "size": len(data)}

    def put_manifest(self, repo: str, reference: str, manifest: dict[str, Any] | bytes,
                     media_type: str = "application/vnd.oci.image.manifest.v1+json") -> str:
        """Push a manifest under a tag (or its digest); the digest the registry announces."""
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest, indent=1).encode()
        status, headers, reply = self.request("PUT", f"/v2/{repo}/manifests/{reference}", data,
                                              {"Content-Type": media_type}, scope=f"repository:{repo}:pull,push")
        assert status == 201, (status, reply)
        return headers["docker-content-digest"]

    def push_manifest_of(self, repo: str, tag: str, layers: list[tuple[str, str, bytes]],
                         artifact_type: str | None = None,
                         config_type: str = "application/vnd.oci.empty.v1+json",
                         path_annotation: str = "org.opencontainers.image.title") -> str:
        """A hand-built image manifest of (path, mediaType, bytes) layers, each path in `path_annotation`; its
        digest."""
        config = self.put_blob(repo, b"{}")
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": {"mediaType": config_type, **config}, "layers": []}
        if artifact_type:
            manifest["artifactType"] = artifact_type
        for title, media_type, data in layers:
            manifest["layers"].append({"mediaType": media_type, **self.put_blob(repo, data),
                                       "annotations": {path_annotation: title}})
        return self.put_manifest(repo, tag, manifest)

    # -- ORAS, as users push -------------------------------------------------------------------------------------
    def push(self, reference: str, files: dict[str, bytes]) -> str:
        """`oras push <host>/<reference> <file>...` with the ORAS Python SDK; the manifest's digest."""
        try:
            import oras.client
        except ImportError:
            skip_or_fail("the ORAS Python SDK is not installed (pip install oras, in weightsync[test])")

        with tempfile.TemporaryDirectory() as scratch:
            paths, titles = [], {}
            for name, data in files.items():
                path = Path(scratch, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                paths.append(str(path))
                titles[str(path)] = {"org.opencontainers.image.title": name}
            annotations = Path(scratch, ".annotations.json")
            annotations.write_text(json.dumps(titles))
            assert not self.users and not self.token, "registries with auth are pushed with push_manifest_of"
            client = oras.client.OrasClient(hostname=self.host, insecure=True)
            response = client.push(target=f"{self.host}/{reference}", files=paths, annotation_file=str(annotations),
                                   disable_path_validation=True)
            assert response.status_code == 201, response.text
        repo, _, tag = reference.rpartition(":")
        status, headers, _ = self.request("HEAD", f"/v2/{repo}/manifests/{tag}", scope=f"repository:{repo}:pull",
                                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert status == 200, status
        return headers["docker-content-digest"]


class RecordingProxy(CountingProxy):
    """A CountingProxy that also keeps the head of every request it forwards (method, target, headers)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self.heads: list[str] = []

    def _pump_up(self, client: socket.socket, upstream: socket.socket, exchange: Any) -> None:
        pending = b""
        try:
            while data := client.recv(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    head, _, pending = pending.partition(b"\r\n\r\n")
                    if head[:4] in (b"GET ", b"HEAD"):  # a GET's body is empty, so the next bytes are a head
                        self.heads.append(head.decode("latin-1"))
                    else:
                        pending = b""  # an upload's body: not parsed, not needed
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)
            upstream.close()


@contextlib.contextmanager
def running(root: Path, **options: Any) -> Iterator[Registry]:
    registry = Registry(root, **options).start()
    try:
        yield registry
    finally:
        registry.stop()
