"""tinyproxy (Debian's) as a real forward proxy on loopback: plain-http requests by absolute URL, https by CONNECT.

Its log (LogLevel Connect) names every upstream host:port it connected to, which is what the proxy tests check.
Missing, the tests that need it skip, unless WS_REQUIRE_TINYPROXY is set (.ci/run installs it), where a skip
would hide a broken install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tinyproxy(directory: Path) -> Iterator[tuple[str, Path]]:
    """(its URL, its log file) while it runs."""
    binary = shutil.which("tinyproxy")
    if binary is None:
        if os.environ.get("WS_REQUIRE_TINYPROXY"):
            pytest.fail("tinyproxy is missing but WS_REQUIRE_TINYPROXY is set")
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy; .ci/run installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = directory / "tinyproxy.log"
    (directory / "tinyproxy.conf").write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{log}\"\nLogLevel Connect\nMaxClients 50\n"
        "Allow 127.0.0.1\nDisableViaHeader Yes\n")  # no ConnectPort line: CONNECT to any port (the TLS servers')
    process = subprocess.Popen([binary, "-d", "-c", str(directory / "tinyproxy.conf")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"tinyproxy did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.terminate()
        process.wait(10)
