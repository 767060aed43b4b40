"""Helpers for running the CLI as users do and comparing what lands on the volume."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent


def weightsync(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI as users do: a separate process, its own stdout/stderr."""
    result = subprocess.run([sys.executable, "-m", "weightsync", *args], env=env, capture_output=True,
                            text=True, timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"weightsync {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def weightsync_popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "weightsync", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def upload_model(client: Any, bucket: str, prefix: str, files: dict[str, bytes], **extra: Any) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}" if prefix else name, Body=data, **extra)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every regular file under `directory` by relative path (to compare byte-identical trees)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one `weightsync: error:` line of a failed run (it must be the last stderr line, no traceback)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("weightsync: error:")]
    assert len(errors) == 1, f"expected exactly one error line, got:\n{result.stderr}"
    assert lines[-1] == errors[0], f"the error line must come last:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return errors[0]


def safetensors_bytes(payload: bytes) -> bytes:
    """A valid single-tensor safetensors file around `payload` (so pre-exec checks accept it)."""
    import json
    import struct

    header = json.dumps({"weights": {"dtype": "U8", "shape": [len(payload)],
                                     "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + payload


def _crc(function: Callable[[bytes, int], int], width: int) -> Callable[[bytes], bytes]:
    return lambda data: function(data, 0).to_bytes(width, "big")


def reference_digests() -> dict[str, Callable[[bytes], bytes]]:
    """Each checksum algorithm by weightsync's name, computed independently of weightsync's checksums.py:
    hashlib, zlib, and awscrt for the two CRCs zlib lacks."""
    from awscrt import checksums as crt

    return {
        "crc32": _crc(zlib.crc32, 4),
        "crc32c": _crc(crt.crc32c, 4),
        "crc64nvme": _crc(crt.crc64nvme, 8),
        "sha1": lambda data: hashlib.sha1(data).digest(),
        "git-sha1": lambda data: hashlib.sha1(b"blob %d\0" % len(data) + data).digest(),
        "sha256": lambda data: hashlib.sha256(data).digest(),
        "md5": lambda data: hashlib.md5(data).digest(),
    }


_LOADED = ("import sys\n"
           "from weightsync.cli import main\n"
           "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
           "import json\n"
           "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}))")


def modules_loaded(*args: str, env: dict[str, str]) -> tuple[int, set[str]]:
    """Run the CLI with `args` in a fresh interpreter: (exit code, every module it loaded)."""
    import json

    out = subprocess.run([sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, env=env,
                         check=True, cwd=ROOT)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


def heavy_modules_loaded(*args: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run the CLI with `args` in a fresh interpreter: (exit code, the weightsync/lazy.py HEAVY modules it loaded)."""
    from weightsync.lazy import is_heavy

    code, modules = modules_loaded(*args, env=env)
    return code, sorted(module for module in modules if is_heavy(module))
