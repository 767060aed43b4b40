"""Generate the deterministic tiny demo model that the example server serves.

The output has the layout of a sharded Hugging Face checkpoint (config.json, safetensors
shards and model.safetensors.index.json), so weightsync syncs, verifies and publishes it
exactly like a real model while it stays small enough for tests. The same arguments always
give byte-identical files, so tests and benchmarks can pin checksums.

    python make_model.py OUT_DIR [--hidden-dim N] [--seed N] [--pad-mb N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

MODEL_TYPE = "weightsync-tiny-mlp"
INPUT_DIM = 8
OUTPUT_DIM = 4
NUM_LAYERS = 3
LABELS = ["cat", "dog", "bird", "fish"]
PAD_TENSOR = "padding"
INDEX_FILE = "model.safetensors.index.json"


def shard_name(number: int, total: int) -> str:
    """Hugging Face shard naming, 1-based: model-00001-of-00002.safetensors."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def build_tensors(hidden_dim: int, seed: int) -> dict[str, np.ndarray]:
    """The MLP weights: layers.{i}.weight is (out, in) like torch.nn.Linear, so x @ W.T + b."""
    rng = np.random.default_rng(seed)
    dims = [INPUT_DIM] + [hidden_dim] * (NUM_LAYERS - 1) + [OUTPUT_DIM]
    tensors: dict[str, np.ndarray] = {}
    for i in range(NUM_LAYERS):
        fan_in, fan_out = dims[i], dims[i + 1]
        # He initialisation keeps ReLU activations alive, so the softmax is not one-hot.
        weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
        tensors[f"layers.{i}.weight"] = weight.astype(np.float32)
        tensors[f"layers.{i}.bias"] = (rng.standard_normal(fan_out) * 0.1).astype(np.float32)
    return tensors


def make_model(out_dir: Path, hidden_dim: int = 32, seed: int = 0, pad_mb: int = 0) -> list[Path]:
    """Write the model into out_dir and return the files written (config, shards, index).

    pad_mb adds a `padding` tensor of that many MiB in its own shard so benchmarks can sync a
    big model; servers load it like any weight but do not use it. Stale shards from an earlier
    run with another shard count are removed so a folder never mixes two models.
    """
    if hidden_dim < 1 or pad_mb < 0:
        raise ValueError("hidden_dim must be >= 1 and pad_mb >= 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tensors = build_tensors(hidden_dim, seed)
    groups = [
        {name: t for name, t in tensors.items() if not name.startswith(f"layers.{NUM_LAYERS - 1}.")},
        {name: t for name, t in tensors.items() if name.startswith(f"layers.{NUM_LAYERS - 1}.")},
    ]
    if pad_mb:
        # A separate RNG stream: padding never changes the MLP weights for the same seed.
        pad_rng = np.random.default_rng([seed, 1])
        groups.append({PAD_TENSOR: pad_rng.random(pad_mb * 2**20 // 4, dtype=np.float32)})

    config = {
        "model_type": MODEL_TYPE,
        "input_dim": INPUT_DIM,
        "hidden_dim": hidden_dim,
        "output_dim": OUTPUT_DIM,
        "num_layers": NUM_LAYERS,
        "labels": LABELS,
        "seed": seed,
        "torch_dtype": "float32",
    }
    written = [out_dir / "config.json"]
    written[0].write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    shard_paths = [out_dir / shard_name(n, len(groups)) for n in range(1, len(groups) + 1)]
    for stale in out_dir.glob("model-*-of-*.safetensors"):
        if stale not in shard_paths:
            stale.unlink()

    weight_map: dict[str, str] = {}
    total_size = 0
    for path, group in zip(shard_paths, groups, strict=True):
        save_file(group, str(path))
        for name, tensor in group.items():
            weight_map[name] = path.name
            total_size += tensor.nbytes
        written.append(path)

    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    written.append(out_dir / INDEX_FILE)
    written[-1].write_text(json.dumps(index, indent=2) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the deterministic weightsync demo model.")
    parser.add_argument("out_dir", type=Path, help="folder to write the model into (created if missing)")
    parser.add_argument("--hidden-dim", type=int, default=32, help="width of the hidden layers (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed; same seed, same bytes (default 0)")
    parser.add_argument("--pad-mb", type=int, default=0, help="add an unused tensor of N MiB (default 0)")
    args = parser.parse_args(argv)
    try:
        files = make_model(args.out_dir, hidden_dim=args.hidden_dim, seed=args.seed, pad_mb=args.pad_mb)
    except ValueError as exc:
        parser.error(str(exc))
    for path in files:
        print(f"{path.stat().st_size:>12}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
