"""Checks before exec: catch a broken model or a missing GPU before the server crash-loops on it.

Both are cheap: safetensors checks read only the headers (8-byte length + JSON),
never the tensors; the GPU check looks for device nodes and nvidia-smi before it
would ever import torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from weightsync.errors import IntegrityError, UsageError
from weightsync.logs import counted

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100 * 1024 * 1024


def safetensors_problems(model_dir: Path, files: Iterable[str]) -> tuple[list[str], str]:
    """Every shard an index names exists; every header parses; every tensor's bytes fit its file.

    `files` are the model's files, relative to `model_dir`: a published revision holds exactly the files of its
    manifest (one rename of the verified tree), so they are taken from there instead of walking the directory
    (a walk of a 1000-file model's directories cost more than the rest of a warm start).
    Returns the problems and one line saying what was checked.
    """
    problems: list[str] = []
    files = list(files)
    indexes = sorted(model_dir / path for path in files if path.endswith(".safetensors.index.json"))
    shards_checked = sorted(model_dir / path for path in files if path.endswith(".safetensors"))
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{index.relative_to(model_dir)}: unreadable index ({exc})")
            continue
        for shard in sorted(shards):
            if not (index.parent / shard).is_file():
                problems.append(f"{index.relative_to(model_dir)}: shard {shard} is missing")
    for path in shards_checked:
        problem = _header_problem(path)
        if problem:
            problems.append(f"{path.relative_to(model_dir)}: {problem}")
    if not shards_checked and not indexes:
        return problems, "no safetensors files, nothing to check (only safetensors models are checked)"
    checked = [f"{counted(len(shards_checked), 'safetensors file')} (header parses, "
               "every tensor's bytes fit the file and match its shape and dtype)"]
    if indexes:
        checked.append(f"{counted(len(indexes), 'index', 'indexes')} (every shard it names is present)")
    return problems, " and ".join(checked)


def _header_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "truncated (no header)"
        length = int.from_bytes(prefix, "little")  # the header's size: an unsigned 64-bit little-endian integer
        if length > min(MAX_HEADER, size - 8):
            return f"header length {length} does not fit the file ({size} bytes)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "header is not valid JSON"
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= dim
            width = DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name} has a malformed header entry"
        if not 0 <= begin <= end <= data_size:
            return f"tensor {name} ends at byte {end} but the file holds {data_size} data bytes (truncated?)"
        if width is not None and end - begin != count * width:
            return f"tensor {name} has {end - begin} bytes, its shape and dtype need {count * width}"
    return None


def check_model(model_dir: Path, files: Iterable[str]) -> str:
    """Raise if the model (`files` in `model_dir`) cannot load; return what was checked, for the log."""
    problems, checked = safetensors_problems(model_dir, files)
    if problems:
        raise IntegrityError(f"{model_dir} is not a loadable model: " + "; ".join(problems[:5])
                             + " — fix the source, or the --include/--exclude that left a file out (or skip this "
                             "check with --skip-checks)")
    return checked


def gpu_visible() -> tuple[bool, str]:
    """Whether a CUDA device is visible to this container, and how we know."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "void", "NoDevFiles"):
        return False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    nodes = sorted(p.name for p in Path("/dev").glob("nvidia[0-9]*"))
    if nodes:
        return True, f"found /dev/{nodes[0]}"
    import shutil  # only --require-gpu gets here: a warm start loads neither
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        if "GPU" in listed:
            return True, "nvidia-smi lists a GPU"
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                return True, "torch.cuda.is_available()"
    except Exception:  # a broken torch install must not mask the answer
        pass
    return False, "no /dev/nvidia* device, no GPU from nvidia-smi, torch sees no CUDA"


def require_gpu() -> None:
    found, why = gpu_visible()
    if not found:
        raise UsageError(f"--require-gpu: no CUDA device is visible ({why}); schedule this pod on a GPU node "
                         "(nvidia.com/gpu resource request) or drop --require-gpu")
