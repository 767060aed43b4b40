"""The progress display: a tqdm bar on a TTY, one plain line every `interval` seconds elsewhere.

On a TTY progress is a tqdm bar (overall, plus one per large file); without one
(kubectl logs, docker logs, CI) it is one `progress` event every `interval`
seconds (logs.py).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

from weightsync.logs import event, human_bytes, human_duration

LARGE_FILE = 256 * 1024 * 1024
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
        self._file_bars: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self._stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="weightsync", file=self._stream, **self._screen())
        elif self.interval > 0:
            self._thread = threading.Thread(target=self._ticker, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        for bar in self._file_bars.values():
            bar.close()
        if self._bar is not None:
            self._bar.close()

    def add_bytes(self, count: int, path: str | None = None, file_size: int = 0) -> None:
        with self._lock:
            self.bytes_done += count
        if self._bar is not None:
            self._bar.update(count)
            if path is not None and file_size >= LARGE_FILE:
                self._file_bar(path, file_size).update(count)

    def _file_bar(self, path: str, size: int) -> Any:
        with self._lock:
            bar = self._file_bars.get(path)
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path[-40:],
                           file=self._stream, position=len(self._file_bars) + 1, leave=False, **self._screen())
                self._file_bars[path] = bar
            return bar

    def _screen(self) -> dict[str, int]:
        """The terminal's size; a pty that reports 0×0 (some `kubectl exec -t`) would hide every bar."""
        try:
            size = os.get_terminal_size(self._stream.fileno())
            columns, lines = size.columns, size.lines
        except (OSError, ValueError, AttributeError):
            columns, lines = 0, 0
        return {"ncols": columns or 100, "nrows": lines or 24}

    def file_done(self, path: str | None = None) -> None:
        with self._lock:
            self.files_done += 1
            bar = self._file_bars.pop(path, None) if path else None
        if bar is not None:
            bar.close()

    def snapshot(self) -> dict[str, float | int]:
        """The numbers of a progress event."""
        with self._lock:
            done, files = self.bytes_done, self.files_done
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        return {"percent": round(100.0 * done / self.total_bytes, 1) if self.total_bytes else 100.0,
                "bytes_done": done, "bytes_total": self.total_bytes, "rate_bytes_per_second": round(rate),
                "eta_seconds": round((self.total_bytes - done) / rate) if rate > 0 else None,
                "files_done": files, "files_total": self.total_files}

    def line(self) -> str:
        n = self.snapshot()
        return (f"progress {n['percent']:5.1f}% {human_bytes(n['bytes_done'])}/{human_bytes(self.total_bytes)} "
                f"at {human_bytes(n['rate_bytes_per_second'])}/s, ETA {human_duration(n['eta_seconds'] or 0)}, "
                f"files {n['files_done']}/{self.total_files}")

    def _ticker(self) -> None:
        while not self._stop.wait(self.interval):
            event("progress", "%s", self.line(), **self.snapshot())
