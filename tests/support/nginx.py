"""A real third-party web server for the https:// source: nginx serving a directory over TLS on loopback.

nginx is what in-cluster model mirrors and many CDN origins run; its static module answers HEAD, single
`bytes=` ranges with 206, strong ETags of `"<mtime>-<size>"`, Last-Modified, and `If-Range` (the whole file
when it names another version). `limit_rate` throttles each connection, so a test can kill a download
half-way. The access log records each request's Range, If-Range, status and bytes sent.

nginx comes from the OS (`apt-get install nginx-light`). Without it `Nginx.start()` raises `Unavailable`; the
fixture turns that into a skip, or a failure when `WS_REQUIRE_NGINX=1` (CI sets it, so a broken install cannot
hide behind a skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.s3server import free_port

REQUIRE_ENV = "WS_REQUIRE_NGINX"
LOG_FORMAT = '$request_method $uri $status $bytes_sent "$http_range" "$http_if_range"'


class Unavailable(RuntimeError):
    """nginx cannot run on this machine (the message says why)."""


class Nginx:
    """nginx serving `root` at `url` (https, with the certificate in `tls_dir`: private_ca's files)."""

    def __init__(self, root: Path, work: Path, tls_dir: Path, limit_rate: str = "0") -> None:
        self.root, self.work, self.tls_dir, self.limit_rate = root, work, tls_dir, limit_rate
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.access_log = work / "access.log"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        if binary is None:
            raise Unavailable("nginx is not installed (apt-get install nginx-light)")
        self.work.mkdir(parents=True, exist_ok=True)
        temp = self.work / "temp"
        temp.mkdir(exist_ok=True)
        config = self.work / "nginx.conf"
        temps = "".join(f"  {kind}_temp_path {temp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                               "uwsgi", "scgi"))
        config.write_text(f"""daemon off;
master_process off;
pid {self.work}/nginx.pid;
error_log {self.work}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format ws escape=none '{LOG_FORMAT}';
  access_log {self.access_log} ws;
{temps}  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port} ssl;
    ssl_certificate {self.tls_dir / "chain.pem"};
    ssl_certificate_key {self.tls_dir / "key.pem"};
    root {self.root};
    limit_rate {self.limit_rate};
  }}
}}
""")
        self._process = subprocess.Popen([binary, "-p", str(self.work), "-c", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise Unavailable(f"nginx exited: {self._process.stderr.read().decode(errors='replace')[-500:]}"
                                  if self._process.stderr else "nginx exited")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise Unavailable("nginx did not start listening within 10 s")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def requests(self) -> list[dict[str, str]]:
        """The access log, one dict per request: method, uri, status, bytes, range, if_range."""
        if not self.access_log.exists():
            return []
        rows = []
        for line in self.access_log.read_text().splitlines():
            head, _, quoted = line.partition(' "')
            method, uri, status, sent = head.split(" ")
            ranged, _, if_range = quoted.partition('" "')
            rows.append({"method": method, "uri": uri, "status": status, "bytes": sent, "range": ranged,
                         "if_range": if_range.rstrip('"')})
        return rows
