"""Run the weightsync CLI with one engine knob changed: for the benchmarks' A/B rows only.

`python benchmarks/variant.py KNOB=VALUE ... -- sync --source ... --dest ...`

Nothing here is a weightsync setting. A tunable (chunk_mib, buffer_kib, ...) sets a field of
`weightsync.config.DEFAULTS`, the one source of transfer defaults; a code-path knob (verify=off,
readback=..., ...) replaces one function in this process, refusing a name that no longer
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
  state=eager     save resume state every MiB (the original behaviour) instead of every 0.1 s
  streams_per_cpu=N  cap on streams per usable CPU for the Hub reader (0: none, weightsync's default)
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
        elif knob == "state" and value == "eager":
            tuned["state_save_interval"] = 0.0
        elif knob == "streams_per_cpu":
            import weightsync.sources.hf as hf

            _patch(hf.HubSource, "features", replace(hf.HubSource.features, streams_per_cpu=int(value) or None))
        else:
            raise SystemExit(f"variant.py: unknown knob {knob}={value}")
    if tuned:
        config.DEFAULTS = replace(config.DEFAULTS, **tuned)


def _patch(owner: object, name: str, value: object) -> None:
    """Replace one attribute, refusing one that does not exist (a rename must not go unnoticed)."""
    if not hasattr(owner, name):
        raise SystemExit(f"variant.py: {getattr(owner, '__name__', owner)} has no {name}: update this knob")
    setattr(owner, name, value)


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
