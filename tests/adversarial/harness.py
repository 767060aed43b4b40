"""Shared pieces of the adversarial suite: a recording CLI runner, model makers, exposure checks.

Every weightsync process the suite starts goes through `ws()` / `ws_popen()`, which
record all of its stdout and stderr, so test_secrets.py can grep the output of the
whole run for the secret values (AWS keys, session token, HF token, HTTP bearer token, signatures).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.helpers import ROOT, tree_bytes

MiB = 1024 * 1024
# Per-run secrets that the suite's runs carry (HF token) or may carry (session token); test_secrets.py greps all
# output for them. Defined here, not in conftest.py: pytest imports conftest under its own module name, so a test
# importing it would get a second, different value.
HF_SECRET_TOKEN = "hf_" + secrets.token_hex(16)
AWS_SESSION_SECRET = "wsSessionToken" + secrets.token_hex(20)
GCS_SECRET_TOKEN = "wsGoogleToken" + secrets.token_hex(20)  # not ya29.-shaped: only never logging it hides it
HTTP_SECRET_TOKEN = "wsHttpBearer" + secrets.token_hex(16)  # WEIGHTSYNC_HTTP_TOKEN of the https:// runs
PRESIGNED_SECRET = "wsPresignedSig" + secrets.token_hex(16)  # a presigned URL's signature in an https:// source
RECORD = Path(os.environ.get("WS_ADVERSARIAL_RECORD") or tempfile.mkdtemp(prefix="ws-adversarial-")) / "outputs.log"
_counts = {"processes": 0}


def record(*texts: str) -> None:
    with RECORD.open("a", encoding="utf-8", errors="replace") as handle:
        for text in texts:
            handle.write(text or "")
            handle.write("\n")
    _counts["processes"] += 1


def recorded() -> str:
    return RECORD.read_text(encoding="utf-8", errors="replace") if RECORD.exists() else ""


def ws(*args: str, env: dict[str, str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the CLI (a separate process, as users do) and record everything it printed."""
    try:
        result = subprocess.run([sys.executable, "-m", "weightsync", *args], env=env, capture_output=True,
                                text=True, timeout=timeout, cwd=ROOT, **kwargs)
    except subprocess.TimeoutExpired as exc:
        record(str(exc.stdout or ""), str(exc.stderr or ""))
        raise AssertionError(f"weightsync {' '.join(args)} hung for more than {timeout}s") from exc
    record(result.stdout, result.stderr)
    return result


class Proc:
    """A weightsync process whose stderr goes to a file, so it can be watched and killed at a moment."""

    def __init__(self, *args: str, env: dict[str, str], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="stderr-", dir=workdir)
        os.close(fd)
        self.err_path = Path(name)
        self.out_path = self.err_path.with_name(self.err_path.name.replace("stderr-", "stdout-"))
        self._err = self.err_path.open("w")
        self._out = self.out_path.open("w")
        self.started = time.monotonic()
        self.popen = subprocess.Popen([sys.executable, "-m", "weightsync", *args], env=env, stdout=self._out,
                                      stderr=self._err, cwd=ROOT, text=True)
        self.pid = self.popen.pid
        self._recorded = False

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.stderr:
                return True
            if self.popen.poll() is not None:
                return needle in self.stderr
            time.sleep(0.02)
        return False

    def kill(self) -> bool:
        """SIGKILL; return True if it was still running (a real kill, not a finished run)."""
        running = self.popen.poll() is None
        if running:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.finish()
        return running

    def wait(self, timeout: float = 120) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            self.finish()
            raise AssertionError(f"weightsync did not finish in {timeout}s:\n{self.stderr}") from None
        self.finish()
        return code

    def finish(self) -> None:
        if not self._recorded:
            self._err.close()
            self._out.close()
            record(self.stdout, self.stderr)
            self._recorded = True


def model(seed: int, shards: int = 3, shard_size: int = 2 * MiB) -> dict[str, bytes]:
    """A multi-file model: shards in a folder, configs, an empty file."""
    rng = random.Random(seed)
    files = {f"model-{i + 1:05d}-of-{shards:05d}.bin": rng.randbytes(shard_size - i * 4096)
             for i in range(shards)}
    files.update({"config.json": b'{"seed": %d}' % seed, "tokenizer/tokenizer.json": rng.randbytes(3000),
                  "tokenizer/special tokens.txt": b"<s> </s>\n", "empty.txt": b""})
    return files


def exposure(name_dir: Path, expected: dict[str, bytes]) -> list[str]:
    """What a reader could be handed that is not the complete model: must always be empty.

    `current` and every directory under revisions/ (what a later run hands out as
    MODEL_DIR once its manifest checks pass) are absent or byte-identical to `expected`.
    """
    problems = []
    current = name_dir / "current"
    if os.path.lexists(current):
        target = current.resolve()
        if not target.is_dir():
            problems.append(f"current -> {os.readlink(current)} does not exist")
        elif tree_bytes(target) != expected:
            problems.append(f"current -> {target.name} is not the complete model")
    revisions = name_dir / "revisions"
    if revisions.is_dir():
        for directory in revisions.iterdir():
            got = tree_bytes(directory)
            if got != expected:
                missing = sorted(set(expected) - set(got))
                problems.append(f"revisions/{directory.name} is partial (missing {missing[:3]})")
    return problems


def snapshot_outside(root: Path, inside: Path) -> dict[str, tuple[int, float]]:
    """Every path under `root` except those under `inside`, with size and mtime (to prove nothing changed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != inside]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = os.lstat(path)
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime)
    return found


def remount_readonly(point: Path) -> None:
    """Remount a tmpfs made by the small_fs fixture read-only; skip where that is not permitted."""
    import pytest

    if os.geteuid() != 0 or subprocess.run(["mount", "-o", "remount,ro", str(point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot remount read-only here")


def last_path(result: subprocess.CompletedProcess[str]) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


class BlackHole:
    """Accepts connections and never answers (a hung load balancer, a stuck server)."""

    def __init__(self) -> None:
        import socket
        import threading

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted = 0
        self._held: list = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        for conn in self._held:
            conn.close()


class FaultProxy:
    """TCP proxy to an HTTP server that misbehaves per connection, in order:

    * the first `slowdown` connections get `503 SlowDown` with `Retry-After: retry_after` and are closed;
    * then a response longer than `stall_after` bytes stops there and the connection stays open, silent,
      for the next `stall_times` such responses (-1: forever);
    * once `dead_after` bytes have gone to clients in all, every connection goes silent (a server, link or
      middlebox that died mid-download: nothing more ever arrives).
    `bytes_down` counts what reached the clients. Bounded: every held connection is released at close().
    """

    def __init__(self, upstream_port: int, slowdown: int = 0, retry_after: int = 2, stall_after: int | None = None,
                 stall_times: int = 0, dead_after: int | None = None) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.slowdown, self.retry_after = slowdown, retry_after
        self.stall_after, self.stall_times = stall_after, stall_times
        self.dead_after = dead_after
        self.stalled = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        import socket
        import threading

        with self._lock:
            slow = self.slowdown > 0
            self.slowdown -= slow
        if slow:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message></Error>")
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nRetry-After: %d\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (self.retry_after, len(body), body))
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def up() -> None:
            try:
                while data := client.recv(65536):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if self.dead_after is not None:
                    with self._lock:
                        allowed = max(0, min(len(data), self.dead_after - self.bytes_down))
                        self.bytes_down += allowed
                    if allowed < len(data):
                        client.sendall(data[:allowed])
                        self._closed.wait(300)  # dead: silent, the connection open
                        break
                    client.sendall(data)
                    continue
                if self.stall_after is not None and sent + len(data) > self.stall_after:
                    with self._lock:
                        stall = self.stall_times != 0
                        if self.stall_times > 0:
                            self.stall_times -= 1
                        self.stalled += stall
                    if stall:
                        client.sendall(data[: self.stall_after - sent])
                        with self._lock:
                            self.bytes_down += self.stall_after - sent
                        self._closed.wait(300)  # silent, connection open: only a read timeout gets out
                        break
                    self.stall_after = None
                client.sendall(data)
                sent += len(data)
                with self._lock:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
