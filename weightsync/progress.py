"""What people see: log lines on stderr, progress a human can read in `kubectl logs`.

On a TTY progress is a tqdm bar; without one (kubectl logs, docker logs, CI) it is
one plain line every `interval` seconds. Every line passes through `redact`, so
credentials and presigned-URL signatures never reach a log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID")
SIGNED_QUERY = re.compile(r"(?i)((?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|"
                          r"key-pair-id|policy|token)=)[^&\s\"']+")
HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{10,}\b")


def redact(text: str) -> str:
    """Remove secret values known from the environment and signature-like URL parameters."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = SIGNED_QUERY.sub(r"\1***", text)
    return HF_TOKEN_SHAPE.sub("hf_***", text)


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(debug: bool, stream: TextIO | None = None) -> None:
    """Log to stderr as `weightsync: message` (with timestamps and levels under --debug)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    fmt = "%(asctime)s weightsync %(levelname)s %(threadName)s: %(message)s" if debug else "weightsync: %(message)s"
    handler.setFormatter(_RedactingFormatter(fmt))
    logger = logging.getLogger("weightsync")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Thread-safe transfer counters with a TTY bar or periodic plain lines."""

    def __init__(self, total_bytes: int, total_files: int, interval: float = 10.0,
                 stream: TextIO | None = None) -> None:
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.bytes_done = 0
        self.files_done = 0
        self.interval = interval
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream = stream or sys.stderr
        self._bar: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="weightsync", file=self._stream, dynamic_ncols=True)
        elif self.interval > 0:
            self._thread = threading.Thread(target=self._ticker, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._bar is not None:
            self._bar.close()

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self.bytes_done += count
        if self._bar is not None:
            self._bar.update(count)

    def file_done(self) -> None:
        with self._lock:
            self.files_done += 1

    def line(self) -> str:
        with self._lock:
            done, files = self.bytes_done, self.files_done
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        percent = 100.0 * done / self.total_bytes if self.total_bytes else 100.0
        eta = (self.total_bytes - done) / rate if rate > 0 else 0
        return (f"progress {percent:5.1f}% {human_bytes(done)}/{human_bytes(self.total_bytes)} "
                f"at {human_bytes(rate)}/s, ETA {human_duration(eta)}, files {files}/{self.total_files}")

    def _ticker(self) -> None:
        log = logging.getLogger("weightsync")
        while not self._stop.wait(self.interval):
            log.info("%s", self.line())
