"""Example inference server: the kind of program weightsync execs once the weights are in place.

weightsync syncs the model into a volume, sets MODEL_DIR and execs this process, so it
becomes the container's main process (often PID 1). It therefore reads everything from
MODEL_DIR, fails fast with one clear line, and exits promptly on SIGTERM. It serves the tiny
MLP written by make_model.py with PyTorch when installed (GPU when available), else NumPy.

    python server.py [--model-dir DIR] [--host H] [--port P] [--device auto|cpu|cuda]

GET /healthz, GET /v1/models, POST /v1/predict {"inputs": [[8 floats], ...]}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file as load_numpy

try:
    import torch
    from safetensors.torch import load_file as load_torch
except ImportError:  # torch is optional: the NumPy backend serves the same model.
    torch = None

MODEL_TYPE = "weightsync-tiny-mlp"
MAX_BODY_BYTES = 1 << 20
MAX_ROWS = 1024


class StartupError(Exception):
    """A problem the operator must fix; main() prints it as one line and exits 2."""


class Shutdown(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT; a BaseException so no `except Exception` eats it."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StartupError(f"{path} not found: is MODEL_DIR the synced model folder?") from None
    except ValueError as exc:
        raise StartupError(f"{path} is not valid JSON: {exc}") from None


class Model:
    """The MLP from make_model.py: Linear -> ReLU -> ... -> Linear -> softmax."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self.config: dict[str, Any] = read_json(model_dir / "config.json")
        if self.config.get("model_type") != MODEL_TYPE:
            raise StartupError(f"unsupported model_type {self.config.get('model_type')!r}, want {MODEL_TYPE}")
        missing = {"input_dim", "hidden_dim", "output_dim", "num_layers", "labels"} - self.config.keys()
        if missing:
            raise StartupError(f"config.json lacks {sorted(missing)}")
        self.model_dir = model_dir
        self.backend, self.device = pick_backend(device)
        self.shards = shard_files(model_dir)
        tensors: dict[str, Any] = {}
        for shard in self.shards:  # read every tensor, unused padding too, as a real server reads its weights
            try:
                tensors.update(load_torch(shard, device=self.device) if self.backend == "torch" else load_numpy(shard))
            except Exception as exc:  # a truncated or corrupt shard: say which, in one line
                raise StartupError(f"cannot load {shard}: {exc}") from None
        self.loaded_bytes = sum(t.nbytes for t in tensors.values())

        cfg = self.config
        dims = [cfg["input_dim"]] + [cfg["hidden_dim"]] * (cfg["num_layers"] - 1) + [cfg["output_dim"]]
        self.layers = []
        for i in range(cfg["num_layers"]):
            weight, bias = tensors.get(f"layers.{i}.weight"), tensors.get(f"layers.{i}.bias")
            if weight is None or bias is None:
                raise StartupError(f"layer {i} is missing from the shards in {model_dir}")
            if tuple(weight.shape) != (dims[i + 1], dims[i]) or tuple(bias.shape) != (dims[i + 1],):
                raise StartupError(f"layer {i} is {tuple(weight.shape)}, config says {(dims[i + 1], dims[i])}")
            self.layers.append((weight, bias))
        self.parameters = sum(math.prod(w.shape) + math.prod(b.shape) for w, b in self.layers)
        self.labels: list[str] = cfg["labels"]

    def predict(self, rows: list[list[float]]) -> list[list[float]]:
        """Softmax probabilities for each input row."""
        last = len(self.layers) - 1
        if self.backend == "torch":
            with torch.inference_mode():
                x = torch.tensor(rows, dtype=torch.float32, device=self.device)
                for i, (weight, bias) in enumerate(self.layers):
                    x = torch.nn.functional.linear(x, weight, bias)
                    if i < last:
                        x = torch.relu(x)
                return torch.softmax(x, dim=-1).cpu().tolist()
        x = np.asarray(rows, dtype=np.float32)
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < last:
                x = np.maximum(x, 0)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).tolist()

    def info(self) -> dict[str, Any]:
        return {
            "model_type": self.config["model_type"],
            "backend": self.backend,
            "device": self.device,
            "parameters": self.parameters,
            "model_dir": str(self.model_dir),
            "input_dim": self.config["input_dim"],
            "labels": self.labels,
            "shards": [s.name for s in self.shards],
        }


def pick_backend(device: str) -> tuple[str, str]:
    """(backend, device): torch on CUDA when possible, torch on CPU, else NumPy on CPU."""
    has_cuda = torch is not None and torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        why = "PyTorch is not installed" if torch is None else "torch.cuda.is_available() is False"
        raise StartupError(f"--device cuda but no CUDA: {why}")
    if torch is None:
        return "numpy", "cpu"
    return "torch", "cuda:0" if device != "cpu" and has_cuda else "cpu"


def shard_files(model_dir: Path) -> list[Path]:
    """The shards the index names (so stray files are ignored), else every *.safetensors."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        names = sorted(set(read_json(index_path).get("weight_map", {}).values()))
        shards = [model_dir / name for name in names]
    else:
        shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise StartupError(f"no safetensors shards in {model_dir}")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise StartupError(f"shards named in {index_path.name} are missing: {missing}")
    return shards


def parse_inputs(body: bytes, input_dim: int) -> list[list[float]]:
    """Validate {"inputs": [[input_dim numbers], ...]}; the ValueError text becomes the 400 message."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"body is not valid JSON: {exc}") from None
    rows = payload.get("inputs") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError('expected {"inputs": [[...], ...]} with at least one row')
    if len(rows) > MAX_ROWS:
        raise ValueError(f"at most {MAX_ROWS} rows per request")
    for n, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != input_dim:
            raise ValueError(f"inputs[{n}] must be a list of {input_dim} numbers")
        for value in row:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"inputs[{n}] must contain only finite numbers")
    return rows


class Handler(BaseHTTPRequestHandler):
    """JSON over HTTP; every request thread shares the one read-only model."""

    model: Model

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self.send_json(200, self.model.info())
        else:
            self.send_json(404, {"error": f"no route GET {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/v1/predict":
            self.send_json(404, {"error": f"no route POST {self.path}"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.send_json(413, {"error": f"need a Content-Length of at most {MAX_BODY_BYTES} bytes"})
            return
        model = self.model
        try:
            rows = parse_inputs(self.rfile.read(int(length)), model.config["input_dim"])
        except ValueError as exc:
            self.send_json(400, {"error": str(exc)})
            return
        outputs = model.predict(rows)
        labels = [model.labels[p.index(max(p))] for p in outputs]
        result = {"outputs": outputs, "labels": labels, "backend": model.backend, "device": model.device}
        self.send_json(200, result)

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: the startup line and errors are all this example prints."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Example inference server for weightsync.")
    parser.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"), help="default: $MODEL_DIR")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", "8080"), help="default: $PORT or 8080")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if torch has it")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    try:
        if not args.model_dir:
            raise StartupError("no model folder: set MODEL_DIR or pass --model-dir")
        if not Path(args.model_dir).is_dir():
            raise StartupError(f"model folder {args.model_dir} does not exist")
        model = Handler.model = Model(Path(args.model_dir), args.device)
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except (StartupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    line = (
        f"example-server: backend={model.backend} device={model.device} params={model.parameters} "
        f"({model.loaded_bytes:,} bytes in {len(model.shards)} shards) from {model.model_dir}, "
        f"listening on http://{host}:{port}"
    )
    print(line, file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def request_shutdown(signum: int, _frame: object) -> None:
    """An installed handler is what lets SIGTERM stop PID 1: the kernel drops unhandled ones there."""
    raise Shutdown(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # Installed before loading, so a pod deleted while a big model loads still stops at once.
    signal.signal(signal.SIGTERM, request_shutdown)
    signal.signal(signal.SIGINT, request_shutdown)
    try:
        return serve(parse_args(argv))
    except Shutdown as stop:
        print(f"example-server: {stop}, shutting down", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
