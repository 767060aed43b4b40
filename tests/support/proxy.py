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
        threading.Thread(target=self._pump_up, args=(client, upstream), daemon=True).start()
        self._pump_down(upstream, client)

    def _pump_up(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                with self.stats.lock:
                    self.stats.bytes_up += len(data)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(upstream)

    def _pump_down(self, upstream: socket.socket, client: socket.socket) -> None:
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
