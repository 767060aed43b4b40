"""A GCS JSON API server for tests: gcp-storage-emulator (PyPI) on loopback, in a subprocess; and the
credential side of GCS at the wire: a fake GKE metadata server, a token endpoint that refuses, and a
gateway that records the Authorization header of each storage request.

`GcsEmulator().start()` runs `python -m tests.support.gcsserver --port N` (this module), which starts
the emulator in memory with the corrections below, and `stop()` ends it. The `upload_*` helpers speak
the JSON API as google-cloud-storage's `Blob.upload_from_filename` does with its defaults: a multipart
upload up to 8 MiB, a resumable one above (here in 8 MiB chunks, so the resumable path is exercised).

What gcp-storage-emulator 2026.7.19 does differently from real GCS (read in its source, checked by
the tests that use it):
- crc32c and md5Hash: computed correctly (google-crc32c and hashlib over the uploaded bytes); the
  conformance suite recomputes both with awscrt and hashlib. Generations are `time.time_ns()` strings,
  unique and increasing, as real ones.
- `alt=media` ignores `generation=` and `ifGenerationMatch=`: it serves whatever is live, so a rewrite
  after listing would be spliced in silently. Real GCS answers 404 for a generation that is no longer
  live (412 for a failed ifGenerationMatch). CORRECTED here: a download naming a generation that is not
  the live one gets 404, as from real GCS on a bucket without object versioning.
- objects.list never paginates (no maxResults, no nextPageToken); real GCS returns at most 1000 items a
  page. CORRECTED here: pages of WS_GCS_PAGE_SIZE items (default 1000) with a nextPageToken.
- compose gives the composite object an md5Hash; real GCS gives composite objects a crc32c only.
  CORRECTED here: compose drops md5Hash.
- One request at a time (http.server.HTTPServer), HTTP/1.0 (a connection per request). CORRECTED to a
  ThreadingHTTPServer, so that concurrent ranged reads and concurrent syncs can overlap as against GCS;
  each reply still closes its connection (the client's pool copes with either).
- Not corrected, not relied on: `fields=` is ignored (whole object resources come back), error replies
  have no JSON body, no `x-goog-generation` / `x-goog-hash` on ranged reads, no authentication at all
  (every request is accepted, with or without a token), no decompressive transcoding.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.s3server import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1024 * 1024
MULTIPART_LIMIT = 8 * MiB  # google-cloud-storage's _MAX_MULTIPART_SIZE: above it, a resumable upload
RESUMABLE_CHUNK = 8 * MiB


class GcsEmulator:
    """The emulator on a free loopback port; `url` is what STORAGE_EMULATOR_HOST takes."""

    def __init__(self, page_size: int = 1000) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.page_size = page_size
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> GcsEmulator:
        env = {**os.environ, "WS_GCS_PAGE_SIZE": str(self.page_size), "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.support.gcsserver", "--port", str(self.port)],
                                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {self.process.returncode}")
            try:
                if self._call("GET", "/")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("gcp-storage-emulator did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ the JSON API

    def _call(self, method: str, target: str, body: bytes = b"",
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, target, body=body or None, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def _json(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
        status, _, data = self._call(method, target, body, headers)
        assert 200 <= status < 300, f"{method} {target}: HTTP {status} {data[:200]!r}"
        return json.loads(data) if data else None

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"models-{uuid.uuid4().hex[:12]}"
        self._json("POST", "/storage/v1/b?project=test", json.dumps({"name": name}).encode(),
                   {"Content-Type": "application/json"})
        return name

    def upload(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        """Upload as `Blob.upload_from_filename` does by default: multipart up to 8 MiB, else resumable."""
        if len(data) <= MULTIPART_LIMIT:
            return self._multipart(bucket, name, data)
        return self._resumable(bucket, name, data)

    def _multipart(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        boundary = "===============" + uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
                f"{json.dumps({'name': name})}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
        return self._json("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body,
                          {"Content-Type": f'multipart/related; boundary="{boundary}"'})

    def _resumable(self, bucket: str, name: str, data: bytes) -> dict[str, Any]:
        status, headers, _ = self._call(
            "POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=resumable", json.dumps({"name": name}).encode(),
            {"Content-Type": "application/json; charset=UTF-8", "X-Upload-Content-Type": "application/octet-stream",
             "X-Upload-Content-Length": str(len(data))})
        assert status == 200 and "location" in headers, status
        target = urllib.parse.urlsplit(headers["location"])
        path = f"{target.path}?{target.query}"
        result: dict[str, Any] = {}
        for start in range(0, len(data), RESUMABLE_CHUNK):
            chunk = data[start:start + RESUMABLE_CHUNK]
            status, _, reply = self._call("PUT", path, chunk, {
                "Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{len(data)}",
                "Content-Type": "application/octet-stream"})
            assert status in (200, 308), (status, reply[:200])
            if status == 200:
                result = json.loads(reply)
        return result

    def compose(self, bucket: str, name: str, sources: list[str]) -> dict[str, Any]:
        body = json.dumps({"sourceObjects": [{"name": s} for s in sources], "destination": {"name": name}})
        return self._json("POST", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}/compose",
                          body.encode(), {"Content-Type": "application/json"})

    def delete(self, bucket: str, name: str) -> None:
        status, _, _ = self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
        assert status in (200, 204), status

    def metadata(self, bucket: str, name: str) -> dict[str, Any]:
        return self._json("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")


# ---------------------------------------------------------------------------------- credentials, at the wire


class _Server:
    """A threaded HTTP server on a free loopback port, stopped by `close`."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _MetadataHandler(_Quiet):
    def do_GET(self) -> None:
        server: FakeMetadataServer = self.server.owner  # type: ignore[attr-defined]
        path, _, query = self.path.partition("?")
        flavor = {"Metadata-Flavor": "Google"}
        if self.headers.get("Metadata-Flavor") != "Google":
            self.reply(403, b"missing Metadata-Flavor", flavor)
            return
        with server.lock:
            server.requests.append(self.path)
        accounts = "/computeMetadata/v1/instance/service-accounts/"
        if path.startswith(accounts + server.email + "/"):  # google-auth asks by the email once it knows it
            path = accounts + "default/" + path[len(accounts + server.email + "/"):]
        account = accounts + "default/"
        if path == "/":
            self.reply(200, b"", flavor)
        elif path == account:
            body = {"email": server.email, "scopes": [server.scope], "aliases": ["default"]}
            self.reply(200, json.dumps(body).encode(), {**flavor, "Content-Type": "application/json"})
        elif path == account + "token":
            with server.lock:
                server.issued.append(f"{server.token_prefix}-{len(server.issued) + 1}")
                token = server.issued[-1]
                server.token_queries.append(urllib.parse.parse_qs(query))
            body = {"access_token": token, "expires_in": server.expires_in, "token_type": "Bearer"}
            self.reply(200, json.dumps(body).encode(), {**flavor, "Content-Type": "application/json"})
        elif path == "/computeMetadata/v1/project/project-id":
            self.reply(200, b"test-project", {**flavor, "Content-Type": "application/text"})
        else:
            self.reply(404, b"", flavor)


class FakeMetadataServer(_Server):
    """The GCE / GKE metadata server as Workload Identity serves it: a ping answered with Metadata-Flavor,
    the default service account, and an access token that expires in `expires_in` seconds. google-auth finds
    it through GCE_METADATA_HOST and GCE_METADATA_IP (`env()`)."""

    def __init__(self, token_prefix: str, expires_in: int = 3600) -> None:
        self.token_prefix, self.expires_in = token_prefix, expires_in
        self.email = "model-reader@test-project.iam.gserviceaccount.com"
        self.scope = "https://www.googleapis.com/auth/cloud-platform"
        self.lock = threading.Lock()
        self.requests: list[str] = []
        self.issued: list[str] = []
        self.token_queries: list[dict[str, list[str]]] = []
        super().__init__(_MetadataHandler)

    def env(self) -> dict[str, str]:
        host = f"127.0.0.1:{self.port}"
        return {"GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}


class _OAuthHandler(_Quiet):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        self.reply(400, json.dumps(body).encode(), {"Content-Type": "application/json"})


class RefusingTokenEndpoint(_Server):
    """An OAuth 2.0 token endpoint that refuses every grant, as Google's does for a revoked or forged key."""

    def __init__(self) -> None:
        super().__init__(_OAuthHandler)


class _RecordingHandler(_Quiet):
    def do_GET(self) -> None:
        server: RecordingGateway = self.server.owner  # type: ignore[attr-defined]
        with server.lock:
            server.authorizations.append(self.headers.get("Authorization", ""))
        if server.refuse:
            body = {"error": {"code": server.refuse, "message": "caller does not have storage.objects.list access"}}
            self.reply(server.refuse, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host")}
        connection = http.client.HTTPConnection("127.0.0.1", server.upstream, timeout=30)
        try:
            connection.request("GET", self.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            passed = {k: v for k, v in response.getheaders()
                      if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server")}
        finally:
            connection.close()
        self.reply(response.status, body, passed)


class RecordingGateway(_Server):
    """An authenticated front for the emulator (which checks no credentials): it records every request's
    Authorization header, forwards the request without it, or refuses with `refuse` (401, 403)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.refuse = 0
        self.lock = threading.Lock()
        self.authorizations: list[str] = []
        super().__init__(_RecordingHandler)


# ---------------------------------------------------------------------------------- the emulator, corrected


def _corrected_handlers() -> None:
    """Patch the emulator's handlers where it departs from real GCS in ways the sync depends on (see above)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original_download, original_ls, original_compose = objects.download, objects.ls, objects.compose
    page_size = int(os.environ.get("WS_GCS_PAGE_SIZE", "1000"))

    def download(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        wanted = (request.query.get("generation") or [None])[0]
        if wanted is not None:
            try:
                live = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                live = {}
            if str(live.get("generation")) != wanted:
                response.status = HTTPStatus.NOT_FOUND
                return
        original_download(request, response, storage)

    def ls(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        original_ls(request, response, storage)
        if response.status != HTTPStatus.OK:
            return
        listing = json.loads(response._content)
        items = sorted(listing.get("items") or [], key=lambda item: item["name"])
        start = int((request.query.get("pageToken") or ["0"])[0])
        listing["items"] = items[start:start + page_size]
        if start + page_size < len(items):
            listing["nextPageToken"] = str(start + page_size)
        response.json(listing)

    def compose(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
        original_compose(request, response, storage)
        if response.status == HTTPStatus.OK:
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            composite = storage.get_file_obj(bucket, name)
            composite.pop("md5Hash", None)
            storage.patch_object(bucket, name, composite)
            response.json(composite)

    replacements = {original_download: download, original_ls: ls, original_compose: compose}
    objects.download, objects.ls, objects.compose = download, ls, compose  # objects.get calls download by name
    server.HANDLERS = tuple((regex, {method: replacements.get(handler, handler) for method, handler in table.items()})
                            for regex, table in server.HANDLERS)
    server.server.HTTPServer = server.server.ThreadingHTTPServer  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    _corrected_handlers()
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True).run()


if __name__ == "__main__":
    main()
