"""A TCP proxy on loopback that counts what crosses it and can misbehave on purpose.

Put it between weightsync and a real server to measure, at the wire, how many
connections were opened and how many bytes the server sent (the "bytes fetched"
of resume and concurrency tests), and to inject faults: throttling, a flipped
byte in a response body, a dropped connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ProxyFaults:
    throttle_bps: int | None = None          # cap server→client bytes per second per connection
    flip_byte_at: int | None = None          # flip the byte at this offset of the next long response stream
    drop_after: int | None = None            # close connections after this many server→client bytes
    drop_times: int = 0                      # how many connections to drop (0 = none)
    # Flip the byte at each of these object offsets in every GET response whose request path contains
    # `corrupt_key` (ranged or not, on every connection): a bit rot or a broken middlebox that a retry
    # does not cure. Offsets are of the object, so the same bytes are damaged whichever range asks.
    corrupt_key: str | None = None
    corrupt_offsets: tuple[int, ...] = (0,)


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.connections = self.bytes_down = self.bytes_up = 0


class CountingProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = ProxyFaults()
        self.stats = ProxyStats()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self.stats.lock:
                self.stats.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        exchange = _HttpExchange(self.faults)
        threading.Thread(target=self._pump_up, args=(client, upstream, exchange), daemon=True).start()
        self._pump_down(upstream, client, exchange)

    def _pump_up(self, client: socket.socket, upstream: socket.socket, exchange: _HttpExchange) -> None:
        try:
            while data := client.recv(65536):
                with self.stats.lock:
                    self.stats.bytes_up += len(data)
                exchange.request_bytes(data)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _pump_down(self, upstream: socket.socket, client: socket.socket, exchange: _HttpExchange) -> None:
        sent = 0
        flip_at = self.faults.flip_byte_at
        dropping = False
        with self.stats.lock:
            if self.faults.drop_times > 0 and self.faults.drop_after is not None:
                self.faults.drop_times -= 1
                dropping = True
        started = time.monotonic()
        try:
            while data := upstream.recv(65536):
                if self.faults.corrupt_key:
                    data = exchange.response_bytes(data)
                if flip_at is not None and sent <= flip_at < sent + len(data):
                    with self.stats.lock:
                        claimed = self.faults.flip_byte_at is not None
                        self.faults.flip_byte_at = None
                    if claimed:
                        index = flip_at - sent
                        data = data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]
                    flip_at = None
                if dropping and self.faults.drop_after is not None and sent + len(data) > self.faults.drop_after:
                    data = data[: max(0, self.faults.drop_after - sent)]
                    client.sendall(data)
                    with self.stats.lock:
                        self.stats.bytes_down += len(data)
                    break
                client.sendall(data)
                sent += len(data)
                with self.stats.lock:
                    self.stats.bytes_down += len(data)
                rate = self.faults.throttle_bps
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def close(self) -> None:
        self._closed.set()
        _close(self._listener)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _HttpExchange:
    """Just enough HTTP/1.1 parsing of one keep-alive connection to find each response's body.

    Requests (from the client under test: GET/HEAD, with a Content-Length body if any) are queued
    as they pass; each response is matched to the oldest one. A response body is framed by
    Content-Length, or chunked; HEAD responses and 204/304 have none. Only the bytes of GET bodies
    for `corrupt_key` are touched.
    """

    def __init__(self, faults: ProxyFaults) -> None:
        self.faults = faults
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._request_buffer = b""
        self._request_body_left = 0
        self._head = b""
        self._body_left = 0          # Content-Length bytes still to pass
        self._body_offset = 0        # object offset of the next body byte
        self._corrupting = False
        self._chunked = False
        self._chunk_left = 0
        self._line = b""

    def request_bytes(self, data: bytes) -> None:
        if not self.faults.corrupt_key:
            return
        buffer = self._request_buffer + data
        while buffer:
            if self._request_body_left:
                taken = min(self._request_body_left, len(buffer))
                self._request_body_left -= taken
                buffer = buffer[taken:]
                continue
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buffer = buffer[:end].decode("latin-1"), buffer[end + 4:]
            method, path = [*head.split(" ", 2), "", ""][:2]
            headers = _headers(head)
            self._request_body_left = int(headers.get("content-length", "0") or 0)
            with self._lock:
                self.requests.append((method, path))
        self._request_buffer = buffer

    def response_bytes(self, data: bytes) -> bytes:
        out = bytearray()
        while data:
            if self._body_left:
                taken = min(self._body_left, len(data))
                piece = bytearray(data[:taken])
                if self._corrupting:
                    for offset in self.faults.corrupt_offsets:
                        if self._body_offset <= offset < self._body_offset + taken:
                            piece[offset - self._body_offset] ^= 0xFF
                self._body_offset += taken
                self._body_left -= taken
                out += piece
                data = data[taken:]
                continue
            if self._chunked:
                data = self._skip_chunked(data, out)
                continue
            self._head += data
            data = b""
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                break
            head, rest = self._head[:end + 4], self._head[end + 4:]
            self._head = b""
            out += head
            self._start_body(head.decode("latin-1"))
            data = rest
        return bytes(out)

    def _start_body(self, head: str) -> None:
        status = int([*head.split(" ", 2), "0"][1] or 0)
        if 100 <= status < 200:
            return  # an interim response: the final one answers the same request
        with self._lock:
            method, path = self.requests.pop(0) if self.requests else ("", "")
        headers = _headers(head)
        if method == "HEAD" or status in (204, 304):
            return
        if "chunked" in headers.get("transfer-encoding", ""):
            self._chunked, self._chunk_left, self._line = True, -1, b""
            return
        self._body_left = int(headers.get("content-length", "0") or 0)
        start = 0
        if headers.get("content-range", "").startswith("bytes "):
            start = int(headers["content-range"][6:].split("-", 1)[0])
        self._body_offset = start
        key = self.faults.corrupt_key
        self._corrupting = bool(method == "GET" and 200 <= status < 300 and key and key in path)

    def _skip_chunked(self, data: bytes, out: bytearray) -> bytes:
        """Pass one step of a chunked body through unchanged; return what is left of `data`."""
        if self._chunk_left > 0:
            taken = min(self._chunk_left, len(data))
            out += data[:taken]
            self._chunk_left -= taken
            if self._chunk_left == 0:
                self._chunk_left = -2  # the CRLF after the chunk
            return data[taken:]
        newline = data.find(b"\n")
        if newline < 0:
            self._line += data
            out += data
            return b""
        line, data = self._line + data[:newline + 1], data[newline + 1:]
        out += line[len(self._line):]
        self._line = b""
        if self._chunk_left == -2:  # the CRLF that ends a chunk's data
            self._chunk_left = -1
        elif self._chunk_left == -3:  # trailers, until an empty line
            if not line.strip():
                self._chunked = False
        else:
            size = int(line.split(b";")[0].strip() or b"0", 16)
            self._chunk_left = size if size else -3
        return data


def _headers(head: str) -> dict[str, str]:
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers
