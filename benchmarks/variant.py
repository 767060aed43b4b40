"""Run the weightsync CLI with one engine knob changed: for the benchmarks' A/B rows only.

`python benchmarks/variant.py KNOB=VALUE ... -- sync --source ... --dest ...`

Nothing here is a weightsync setting. A tunable (chunk_mib, buffer_kib, ...) sets a field of
`weightsync.config.DEFAULTS`, the one source of transfer defaults; a code-path knob (verify=off,
readback=..., direct=off, ...) replaces one function in this process, refusing a name that no longer
exists. Each measures what one design choice costs or saves (benchmarks/README.md, "What was tried").
With `--code DIR`, the weightsync package is imported from DIR instead (e.g. an older
commit exported by experiments.py) and no knob may be given.

Knobs:
  verify=off      no sha256, no checksum comparison (to show what verification costs)
  fsync=off       no fsync / writeback before publish (the peers never fsync)
  chunk_mib=N     ranged-GET size (MIN_CHUNK)
  buffer_kib=N    readinto buffer per worker
  catch_up_mib=N  hash behind the writers every N MiB written (0: only when a chunk completes)
  window_mib=N    size of the mmap windows the hash reads through
  readback=pread  read back with os.pread (a new bytes object per block) instead of mmap
  readback=preadv read back with os.preadv into one reused buffer instead of mmap
  prealloc=off    sparse ftruncate'd part files instead of fallocate
  writeback=off   no sync_file_range as chunks finish: the final fsync writes everything
  direct=off      read S3 bodies through botocore/urllib3 readinto (a read() and a copy)
  state=eager     save resume state every MiB (the original behaviour) instead of every 0.1 s
  hf_read=chunked the original Hub reader: iter_raw(1 MiB), whose chunker copies every byte twice more
  hf_readsize=N   httpcore's socket read size in KiB (weightsync sets 256; httpcore's own is 64)
  streams_per_cpu=N  cap on streams per usable CPU for the Hub reader (0: none; weightsync uses 2)
  hf_direct=on    prototype: GET the Hub's CDN redirect with http.client readinto (no proxy/TLS care)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def apply(knobs: dict[str, str]) -> None:
    """Tunables change `weightsync.config.DEFAULTS` (dataclasses.replace: a renamed field fails loudly); the
    code-path knobs replace one function, each checked to exist first."""
    from dataclasses import replace

    import weightsync.config as config

    tuned: dict[str, object] = {}
    for knob, value in knobs.items():
        if knob == "verify" and value == "off":
            import weightsync.checksums as checksums
            import weightsync.download as download

            _patch(download.PrefixHasher, "advance",
                   lambda self, fd, frontier, blocking: setattr(self, "hashed", frontier()))
            _patch(checksums.Verifier, "finish", lambda self: "0" * 64)
        elif knob == "fsync" and value == "off":
            tuned["fsync"] = False
        elif knob == "chunk_mib":
            tuned["min_chunk_size"] = int(value) << 20
        elif knob == "buffer_kib":
            tuned["buffer_size"] = int(value) << 10
            tuned["min_buffer_size"] = min(int(value) << 10, config.DEFAULTS.min_buffer_size)
        elif knob == "catch_up_mib":
            tuned["catch_up_every"] = int(value) << 20
        elif knob == "window_mib":
            tuned["hash_window"] = int(value) << 20
        elif knob == "readback" and value in ("pread", "preadv"):
            _readback(value)
        elif knob == "prealloc" and value == "off":
            import weightsync.partfile as partfile

            _patch(partfile, "preallocate", lambda fd, size: None)
        elif knob == "writeback" and value == "off":
            import weightsync.partfile as partfile

            _patch(partfile, "start_writeback", lambda fd, offset, length: None)
        elif knob == "direct" and value == "off":
            import weightsync.sources.s3 as s3

            _patch(s3, "_direct_stream", lambda body: (None, None))
        elif knob == "state" and value == "eager":
            tuned["state_save_interval"] = 0.0
        elif knob == "hf_read" and value == "chunked":
            _hf_chunked_reads()
        elif knob == "hf_readsize":
            import httpcore2._sync.http11 as http11

            import weightsync.sources.hf as hf

            _patch(hf, "SOCKET_READ", int(value) << 10)
            http11.HTTP11Connection.READ_NUM_BYTES = int(value) << 10
        elif knob == "streams_per_cpu":
            import weightsync.sources.hf as hf

            _patch(hf.HubSource, "features", replace(hf.HubSource.features, streams_per_cpu=int(value) or None))
        elif knob == "hf_direct" and value == "on":
            _hf_direct()
        else:
            raise SystemExit(f"variant.py: unknown knob {knob}={value}")
    if tuned:
        config.DEFAULTS = replace(config.DEFAULTS, **tuned)


def _patch(owner: object, name: str, value: object) -> None:
    """Replace one attribute, refusing one that does not exist (a rename must not go unnoticed)."""
    if not hasattr(owner, name):
        raise SystemExit(f"variant.py: {getattr(owner, '__name__', owner)} has no {name}: update this knob")
    setattr(owner, name, value)


def _hf_chunked_reads() -> None:
    """The original Hub reader: iter_raw(1 MiB) (httpx's ByteChunker), one piece per readinto."""
    import weightsync.sources.hf as hf

    class ChunkedRange(hf._HubRange):
        def __init__(self, response: object, what: str) -> None:
            super().__init__(response, what)
            self._pieces = response.iter_raw(1024 * 1024)

        def readinto(self, buffer: memoryview) -> int:
            if not self._pending:
                try:
                    self._pending = memoryview(next(self._pieces))
                except StopIteration:
                    return 0
            count = min(len(buffer), len(self._pending))
            buffer[:count] = self._pending[:count]
            self._pending = self._pending[count:]
            return count

    _patch(hf, "_HubRange", ChunkedRange)


def _hf_direct() -> None:
    """Prototype: resolve through httpx, then GET the CDN URL with http.client and readinto (no TLS/proxy care)."""
    import http.client
    import threading
    from urllib.parse import urljoin, urlsplit

    import weightsync.sources.hf as hf

    local = threading.local()
    original = hf.HubSource.open_range

    class SocketRange:
        def __init__(self, response: http.client.HTTPResponse) -> None:
            self._response = response

        def readinto(self, buffer: memoryview) -> int:
            return self._response.readinto(buffer)

        def close(self) -> None:
            if not self._response.isclosed():
                self._response.close()
                local.connections = {}

    def open_range(self: hf.HubSource, file: object, start: int, end: int) -> object:
        from huggingface_hub.utils import build_hf_headers, get_session

        url = file.locator
        headers = build_hf_headers(library_name="weightsync")
        headers["Range"] = f"bytes={start}-{end - 1}"
        session = get_session()
        response = session.send(session.build_request("GET", url, headers=headers), stream=True,
                                follow_redirects=False)
        if response.status_code not in (301, 302, 303, 307, 308):
            response.close()
            return original(self, file, start, end)
        location = urljoin(url, response.headers["Location"])
        response.close()
        parts = urlsplit(location)
        connections = getattr(local, "connections", None) or {}
        local.connections = connections
        key = (parts.scheme, parts.netloc)
        if key not in connections:
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connections[key] = kind(parts.netloc, timeout=self.transfer.stall_timeout)
        connection = connections[key]
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path, headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        got = connection.getresponse()
        if got.status != 206:
            raise RuntimeError(f"CDN answered {got.status}")
        return SocketRange(got)

    _patch(hf.HubSource, "open_range", open_range)


def _readback(how: str) -> None:
    import weightsync.download as download

    def hash_from_disk(self: download.PrefixHasher, fd: int, offset: int, length: int) -> None:
        if how == "pread":
            self.verifier.update(os.pread(fd, length, offset))
            return
        if self._scratch is None or len(self._scratch) < length:
            self._scratch = memoryview(bytearray(max(length, self._window)))
        count = os.preadv(fd, [self._scratch[:length]], offset)
        self.verifier.update(self._scratch[:count])

    _patch(download.PrefixHasher, "_hash_from_disk", hash_from_disk)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    settings, cli_args = argv[:split], argv[split + 1:]
    knobs: dict[str, str] = {}
    code: str | None = None
    for item in settings:
        if item.startswith("--code="):
            code = item.split("=", 1)[1]
        else:
            key, _, value = item.partition("=")
            knobs[key] = value
    sys.path.insert(0, code or str(Path(__file__).resolve().parent.parent))
    if code:  # an editable install's import hook would otherwise still serve the checkout's modules
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    if code and knobs:
        raise SystemExit("variant.py: --code runs that code as it is; no knobs")
    if knobs:
        apply(knobs)
    from weightsync.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
