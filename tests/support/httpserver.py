"""A plain HTTP(S) file server on loopback, for the https:// source: Range, ETag, If-Range, HEAD, digest headers,
a bearer token, a redirect to a second origin, and faults on purpose.

It serves `files` (URL path -> bytes) the way a static web server or object-store website does: a strong
ETag derived from the content (`W/` weak ones on request), Last-Modified that moves when a file changes,
`Accept-Ranges: bytes`, 206 with Content-Range for a single `bytes=a-b` range, and the whole file (200) when
`If-Range` names another version, as RFC 9110 says. Known differences from nginx / Apache / a CDN: one range
per request (no multipart/byteranges), no conditional GETs (If-None-Match, If-Modified-Since), no compression,
and the digest headers (`Repr-Digest`, RFC 9530, or the older `Digest`, RFC 3230) are computed per reply
instead of configured. Faults: a flipped byte in the bytes served (`corrupt`), a stall after the headers
(`stall`), a file replaced after some bytes of it went out and the connection dropped (`change_after`), a
per-connection throttle, a HEAD refused as a URL presigned for GET refuses it (`head_status`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import ipaddress
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote

CHUNK = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    bytes_sent: int = 0

    @property
    def authenticated(self) -> bool:
        return "authorization" in self.headers


@dataclass
class Faults:
    corrupt: set[str] = field(default_factory=set)  # URL paths whose served bytes get their middle byte flipped
    stall: set[str] = field(default_factory=set)  # URL paths whose GET sends the headers, then nothing
    change_after: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # path -> (bytes, new content)
    throttle_bps: int | None = None
    ignore_range: bool = False
    head_status: int | None = None  # answer every HEAD with this (403: a URL presigned for GET only)


class HttpServer:
    """`with HttpServer(files, tls=...) as server:` serves `files` at `server.url`; `requests` logs every request."""

    def __init__(self, files: dict[str, bytes] | None = None, *, tls: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1", token: str | None = None, digest: str | None = None,
                 etag: str = "strong", redirect_to: HttpServer | None = None, redirect_query: str = "") -> None:
        self.files: dict[str, bytes] = files if files is not None else {}
        self.token, self.digest, self.etag_kind = token, digest, etag
        self.redirect_to, self.redirect_query = redirect_to, redirect_query
        self.faults = Faults()
        self.requests: list[Request] = []
        self._modified: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def put(self, path: str, data: bytes) -> None:
        """Create or replace a file: a new ETag, and a Last-Modified one second later than the last."""
        with self._lock:
            self.files[path] = data
            self._modified[path] = max(time.time(), self._modified.get(path, 0) + 1)

    def etag(self, path: str) -> str:
        tag = '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'
        return "W/" + tag if self.etag_kind == "weak" else tag

    def last_modified(self, path: str) -> str:
        with self._lock:
            stamp = self._modified.setdefault(path, time.time())
        return formatdate(stamp, usegmt=True)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return sum(r.bytes_sent for r in self.requests)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: HttpServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        server = self.owner
        path = unquote(self.path.split("?", 1)[0])
        record = Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        with server._lock:
            server.requests.append(record)
        if server.token is not None and self.headers.get("Authorization") != f"Bearer {server.token}":
            return self._empty(record, 401, {"WWW-Authenticate": "Bearer"})
        if self.command == "HEAD" and server.faults.head_status:
            return self._empty(record, server.faults.head_status, {})
        if server.redirect_to is not None:
            location = server.redirect_to.url + self.path + (f"?{server.redirect_query}" if server.redirect_query
                                                             else "")
            return self._empty(record, 302, {"Location": location})
        data = server.files.get(path)
        if data is None:
            return self._empty(record, 404, {})
        size, etag, modified = len(data), server.etag(path), server.last_modified(path)
        headers = {"ETag": etag, "Last-Modified": modified, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if server.digest:
            value = base64.b64encode(hashlib.sha256(data).digest()).decode()
            headers.update({"Repr-Digest": f"sha-256=:{value}:"} if server.digest == "repr"
                           else {"Digest": f"SHA-256={value}"})
        start, end, status = 0, size, 200
        wanted = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        current = if_range in (etag, modified) and not (if_range or "").startswith("W/")
        if wanted and wanted.startswith("bytes=") and not server.faults.ignore_range and (if_range is None or
                                                                                          current):
            first, _, last = wanted[6:].partition("-")
            start = int(first)
            end = min(int(last) + 1, size) if last else size
            if start >= size or start >= end:
                return self._empty(record, 416, {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not body:
            return
        if path in server.faults.stall:
            self.wfile.flush()
            server._stopping.wait(60)
            self.close_connection = True
            return
        self._send_body(record, path, data, start, end)

    def _send_body(self, record: Request, path: str, data: bytes, start: int, end: int) -> None:
        server, faults = self.owner, self.owner.faults
        began, sent = time.monotonic(), 0
        flip = len(data) // 2 if path in faults.corrupt else -1
        change = faults.change_after.get(path)
        for offset in range(start, end, CHUNK):
            piece = bytearray(data[offset:min(offset + CHUNK, end)])
            if offset <= flip < offset + len(piece):
                piece[flip - offset] ^= 0xFF
            if change is not None and sent + len(piece) > change[0]:
                piece = piece[:max(0, change[0] - sent)]
                self._write(record, bytes(piece))
                del faults.change_after[path]
                server.put(path, change[1])
                self.close_connection = True
                return
            if not self._write(record, bytes(piece)):
                return
            sent += len(piece)
            if faults.throttle_bps:
                ahead = sent / faults.throttle_bps - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def _write(self, record: Request, piece: bytes) -> bool:
        try:
            self.wfile.write(piece)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        with self.owner._lock:
            record.bytes_sent += len(piece)
        return True

    def _empty(self, record: Request, status: int, headers: dict[str, str]) -> None:
        record.status = status
        self.send_response(status)
        for name, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()


def private_ca(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (ca.pem) and a server context presenting a certificate it signed for 127.0.0.1 and
    localhost: what an in-cluster mirror behind a company CA looks like."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightsync test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(hours=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, chain_path, key_path = directory / "ca.pem", directory / "chain.pem", directory / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain_path, key_path)
    return ca_path, context


def write_lockfile(path: Path, source: str, files: dict[str, bytes]) -> Path:
    """A weightsync lockfile naming `files` (relative path -> bytes) under the base URL `source`."""
    from weightsync.lockfile import Lockfile
    from weightsync.manifest import ManifestEntry

    entries = tuple(ManifestEntry(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in files.items())
    path.write_text(Lockfile(source=source, revision="", files=entries).to_json())
    return path
