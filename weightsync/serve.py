"""`weightsync serve`: the Kubernetes native-sidecar mode.

Sync once, then report ready (a readiness file and/or HTTP /readyz on
--metrics-port, for a startupProbe), keep serving /metrics, and every
--recheck-interval seconds look for a new revision of the branch/prefix. A new
revision is published next to the current one and `current` flips atomically;
the main container keeps the files it has open until it restarts. A failed
re-check is logged and retried at the next interval; SIGTERM ends the loop.
"""

from __future__ import annotations

import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightsync.errors import WeightsyncError
from weightsync.fsutil import write_atomic
from weightsync.logs import event

if TYPE_CHECKING:
    from weightsync.commands import Options, Reporter
    from weightsync.engine import Engine, SyncResult

log = logging.getLogger("weightsync")


class _State:
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.ready = threading.Event()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics" and state.reporter.metrics is not None:
                body, status, kind = state.reporter.metrics.text(), 200, "text/plain; version=0.0.4"
            elif path == "/readyz":
                ready = state.ready.is_set()
                body, status, kind = (b"ready\n" if ready else b"syncing\n"), (200 if ready else 503), "text/plain"
            elif path in ("/healthz", "/livez"):
                body, status, kind = b"ok\n", 200, "text/plain"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def serve(engine: Engine, reporter: Reporter, options: Options) -> int:
    state = _State(reporter)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = None
    if options.metrics_port:
        server = ThreadingHTTPServer(("0.0.0.0", options.metrics_port), _handler(state))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        event("serving", "serving /metrics, /readyz and /healthz on port %d", options.metrics_port,
              port=options.metrics_port)
    try:
        result = reporter.sync(engine)
        print(result.model_dir, flush=True)
        _mark_ready(state, options.ready_file, result)
        interval = options.recheck_interval or 0.0
        current = result.revision
        while not stop.wait(interval if interval > 0 else None):
            current = _recheck(engine, reporter, current)
        event("stopping", "stopping on signal")
        return 0
    finally:
        if server is not None:
            server.shutdown()


def _mark_ready(state: _State, ready_file: str | None, result: SyncResult) -> None:
    if ready_file:
        write_atomic(Path(ready_file), f"{result.model_dir}\n".encode(), durable=False)
    state.ready.set()
    event("ready", "ready: %s", result.model_dir, path=str(result.model_dir))


def _recheck(engine: Engine, reporter: Reporter, current: str) -> str:
    from weightsync.engine import Engine

    try:
        result = reporter.sync(Engine(engine.request, sources=engine.sources))
    except WeightsyncError as exc:
        event("recheck_failed", "re-check failed, keeping %s: %s", current, exc, level=logging.WARNING,
              error=str(exc))
        return current
    if result.revision != current:
        event("new_revision", "new revision %s published next to %s; `current` now points at it", result.revision,
              current, revision=result.revision, previous=current, path=str(result.path))
    return result.revision
