"""A GCS JSON API server for tests: gcp-storage-emulator (PyPI) on loopback, in a subprocess.

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
import time
import urllib.parse
import uuid
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
