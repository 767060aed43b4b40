"""Keep-alive HTTP(S) connections for the sources' own clients: a pool, proxies, TLS, timeouts.

Each request takes a connection, and gives it back once its reply was read to the end
(a reply abandoned half-way closes its connection instead: its unread bytes would be
the next reply's start). Proxies come from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`
(CONNECT tunnels for https, the absolute URL for http); TLS uses the system's CAs, or
the bundle a source names instead (`AWS_CA_BUNDLE`) or on top (`REQUESTS_CA_BUNDLE`). A
read silent for `read_timeout` raises, which the engine turns into a resumed retry.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable

from weightsync.errors import TransientError


class Pool:
    """Idle keep-alive connections per (scheme, host, port), each used by one request at a time."""

    def __init__(self, connect_timeout: float, read_timeout: float, size: int, ca_bundle: str = "",
                 extra_ca: str = "") -> None:
        self._connect_timeout, self._read_timeout, self._size = connect_timeout, read_timeout, size
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ca_bundle, self._extra_ca = ca_bundle, extra_ca
        self._tls: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        """`ca_bundle` instead of the system's CAs; `extra_ca` on top of them (or of `ca_bundle`)."""
        with self._lock:
            if self._tls is None:
                context = ssl.create_default_context(cafile=self._ca_bundle or None)
                if self._extra_ca:
                    context.load_verify_locations(cafile=self._extra_ca)
                self._tls = context
            return self._tls

    def take(self, scheme: str, host: str, port: int) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to (scheme, host, port), and whether it was reused (so it may be stale)."""
        with self._lock:
            idle = self._idle.get((scheme, host, port))
            if idle:
                return idle.pop(), True
        return self._connect(scheme, host, port), False

    def give_back(self, scheme: str, host: str, port: int, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((scheme, host, port), [])
            if len(idle) < self._size:
                idle.append(connection)
                return
        connection.close()

    def send(self, scheme: str, host: str, port: int, method: str, target: str, headers: dict[str, str],
             body: bytes | bytearray | memoryview | None = None) -> Body:
        """Send one request (with a small in-memory `body`: a token request's form, an upload's part) and read the
        reply's head; its body is the caller's to read or close.

        `body` is an in-memory payload (a mirror's part, a PutObject, a CompleteMultipartUpload XML): its length
        is known, so it goes out with Content-Length, and it can be sent again on a retry. Reads send none.
        A pooled connection the server had closed meanwhile (keep-alive timeout) fails
        before any reply byte: that request is sent once more on a fresh connection.
        """
        if scheme == "http" and proxy_for(scheme, host):
            target = f"http://{host if port == 80 else f'{host}:{port}'}{target}"  # what a plain-http proxy takes
        for attempt in (1, 2):
            connection, reused = self.take(scheme, host, port)
            try:
                connection.request(method, target, body=body, headers=headers)
                response = connection.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                connection.close()
                if not reused or attempt == 2:  # a fresh connection that fails is the server's answer
                    raise
            except BaseException:
                connection.close()
                raise

        def release(whole: bool) -> None:
            if whole and not response.will_close:
                self.give_back(scheme, host, port, connection)
            else:
                connection.close()

        return Body(response, {name.lower(): value for name, value in response.getheaders()}, release)

    def _connect(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        proxy = proxy_for(scheme, host)
        connection: http.client.HTTPConnection
        if scheme == "https":
            if proxy:
                connection = http.client.HTTPSConnection(proxy.hostname or "", proxy.port or 80,
                                                         timeout=self._connect_timeout, context=self._context())
                connection.set_tunnel(host, port, headers=_proxy_auth(proxy))
            else:
                connection = http.client.HTTPSConnection(host, port, timeout=self._connect_timeout,
                                                         context=self._context())
        else:
            target = (proxy.hostname or "", proxy.port or 80) if proxy else (host, port)
            connection = http.client.HTTPConnection(*target, timeout=self._connect_timeout)
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(self._read_timeout)  # a stalled read raises after this long
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection


def proxy_for(scheme: str, host: str) -> urllib.parse.SplitResult | None:
    """The proxy the environment names for this scheme and host (`HTTPS_PROXY`, `NO_PROXY`), or None."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme)
    if not url or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return urllib.parse.urlsplit(url if "://" in url else f"http://{url}")


def _proxy_auth(proxy: urllib.parse.SplitResult) -> dict[str, str]:
    if not proxy.username:
        return {}
    import base64

    pair = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


class Body:
    """A reply's body, read with http.client's `readinto` straight from the socket into the caller's buffer (no
    bytes object, no second copy); the connection goes back to the pool once every byte was read, and is dropped
    if the reader stops early."""

    def __init__(self, response: http.client.HTTPResponse, headers: dict[str, str],
                 release: Callable[[bool], None]) -> None:
        self.status, self.headers = response.status, headers
        self._response = response
        self._release: Callable[[bool], None] | None = release

    def readinto(self, buffer: memoryview) -> int:
        if self._release is None:
            return 0
        count = self._response.readinto(buffer)
        if self._response.isclosed():
            self._finish(True)
        return count

    def read_all(self) -> bytes:
        """The whole (small) body: a listing, an error."""
        try:
            data = self._response.read()
        except BaseException:
            self._finish(False)
            raise
        self._finish(True)
        return data

    def close(self) -> None:
        self._finish(False)

    def _finish(self, whole: bool) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release(whole)


class RangeBody:
    """A ranged GET's body as the engine's RangeReader: a read error becomes TransientError, so the engine
    resumes the range from the bytes it has. `voids` names the promise fields this reply proved unsound."""

    def __init__(self, body: Body, what: str, voids: dict[str, str] | None = None) -> None:
        self._body, self.what = body, what
        self.voids: dict[str, str] = voids or {}

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self._body.readinto(buffer)
        except Exception as exc:
            raise TransientError(f"{self.what}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection must not mask the real error
            self._body.close()
