"""The example inference server and its demo model, tested as users run them: as files, in a subprocess.

docker/example-server is not a package (it is copied into an image), so make_model.py is
imported by path and server.py only ever runs as `python server.py`, exactly as weightsync
execs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "docker" / "example-server"
SERVER = EXAMPLE_DIR / "server.py"
INPUTS = [[0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, -2.0], [0.0] * 8, [-3.0, 2.0, 1.0, 0.5, -1.0, 4.0, 0.0, 1.0]]


def load_make_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_make_model", EXAMPLE_DIR / "make_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_model_module = load_make_model()
make_model = make_model_module.make_model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(model_dir: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "PORT")}
    if model_dir is not None:
        env["MODEL_DIR"] = str(model_dir)
    return env


def request(url: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for GET, or POST when body is given; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def start_server(model_dir: Path, prefix: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """Start server.py on a free loopback port and wait until /healthz answers."""
    port = free_port()
    cmd = [*(prefix or []), sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=server_env(model_dir), stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if request(f"{base}/healthz") == (200, {"status": "ok"}):
                return proc, base
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server not healthy after 10 s: {proc.communicate()[1]}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def reference_forward(model_dir: Path, rows: list[list[float]]) -> np.ndarray:
    """An independent float64 forward pass over the shards, to check the server's arithmetic."""
    config = json.loads((model_dir / "config.json").read_text())
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(model_dir / shard))
    x = np.asarray(rows, dtype=np.float64)
    for i in range(config["num_layers"]):
        x = x @ tensors[f"layers.{i}.weight"].astype(np.float64).T + tensors[f"layers.{i}.bias"]
        if i < config["num_layers"] - 1:
            x = np.maximum(x, 0.0)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    make_model(out)
    return out


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, base = start_server(model_dir)
    yield proc, base
    stop(proc)


def test_make_model_is_byte_identical_across_runs(tmp_path: Path) -> None:
    first = make_model(tmp_path / "a", hidden_dim=16, seed=7)
    second = make_model(tmp_path / "b", hidden_dim=16, seed=7)
    assert [p.name for p in first] == [p.name for p in second]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    other_seed = make_model(tmp_path / "c", hidden_dim=16, seed=8)
    assert first[1].read_bytes() != other_seed[1].read_bytes()


def test_make_model_writes_a_hugging_face_sharded_checkpoint(tmp_path: Path) -> None:
    files = make_model(tmp_path)
    names = sorted(p.name for p in files)
    assert names == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded = load_file(tmp_path / shard)
        assert all(index["weight_map"][name] == shard for name in loaded)
        tensors.update(loaded)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert tensors["layers.0.weight"].shape == (32, 8)
    assert tensors["layers.2.weight"].shape == (4, 32)


def test_pad_mb_adds_an_unused_shard_without_changing_the_weights(tmp_path: Path) -> None:
    make_model(tmp_path / "plain")
    files = make_model(tmp_path / "padded", pad_mb=1)
    shards = sorted(p.name for p in files if p.suffix == ".safetensors")
    assert shards == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
    assert load_file(files[3])["padding"].nbytes == 2**20
    plain = load_file(tmp_path / "plain" / "model-00001-of-00002.safetensors")
    padded = load_file(tmp_path / "padded" / "model-00001-of-00003.safetensors")
    assert all(np.array_equal(plain[name], padded[name]) for name in plain)
    make_model(tmp_path / "padded")  # regenerating without padding drops the stale 3-shard files
    assert sorted(p.name for p in (tmp_path / "padded").glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_make_model_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, str(EXAMPLE_DIR / "make_model.py"), str(tmp_path / "m"), "--hidden-dim", "8"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    assert "model.safetensors.index.json" in out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_dim"] == 8


def test_healthz_and_model_info(server: tuple[subprocess.Popen[str], str], model_dir: Path) -> None:
    _, base = server
    assert request(f"{base}/healthz") == (200, {"status": "ok"})
    status, info = request(f"{base}/v1/models")
    assert status == 200
    assert info["model_type"] == "weightsync-tiny-mlp"
    assert info["backend"] in ("numpy", "torch")
    assert info["device"] in ("cpu", "cuda:0")
    assert info["model_dir"] == str(model_dir)
    assert info["parameters"] == 8 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4


def test_predict_matches_a_numpy_reference(server: tuple[subprocess.Popen[str], str], model_dir: Path) -> None:
    _, base = server
    status, reply = request(f"{base}/v1/predict", json.dumps({"inputs": INPUTS}).encode())
    assert status == 200, reply
    outputs = np.asarray(reply["outputs"])
    assert outputs.shape == (len(INPUTS), 4)
    assert np.all(outputs >= 0) and np.all(outputs <= 1)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-5)
    expected = reference_forward(model_dir, INPUTS)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    labels = json.loads((model_dir / "config.json").read_text())["labels"]
    assert reply["labels"] == [labels[i] for i in expected.argmax(axis=1)]
    assert reply["backend"] in ("numpy", "torch")
    assert reply["device"] in ("cpu", "cuda:0")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2, 3]",
        b'{"rows": [[1, 2, 3, 4, 5, 6, 7, 8]]}',
        b'{"inputs": []}',
        b'{"inputs": [[1, 2, 3]]}',
        b'{"inputs": [1, 2, 3, 4, 5, 6, 7, 8]}',
        b'{"inputs": [["a", 2, 3, 4, 5, 6, 7, 8]]}',
        b'{"inputs": [[true, 2, 3, 4, 5, 6, 7, 8]]}',
        b'{"inputs": [[NaN, 2, 3, 4, 5, 6, 7, 8]]}',
    ],
)
def test_bad_input_is_400(server: tuple[subprocess.Popen[str], str], body: bytes) -> None:
    _, base = server
    status, reply = request(f"{base}/v1/predict", body)
    assert status == 400
    assert isinstance(reply["error"], str) and reply["error"]


def test_unknown_route_is_404(server: tuple[subprocess.Popen[str], str]) -> None:
    _, base = server
    assert request(f"{base}/v2/nothing")[0] == 404
    assert request(f"{base}/v1/models", b"{}")[0] == 404


@pytest.mark.parametrize("model_dir_arg", [None, "does-not-exist"])
def test_missing_model_dir_exits_2_with_one_error_line(tmp_path: Path, model_dir_arg: str | None) -> None:
    env = server_env(None if model_dir_arg is None else tmp_path / model_dir_arg)
    result = subprocess.run(
        [sys.executable, str(SERVER), "--port", "0"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_device_cuda_without_cuda_exits_2(model_dir: Path) -> None:
    if importlib.util.find_spec("torch") is not None:
        probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
        if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60).returncode == 0:
            pytest.skip("CUDA is available here")
    cmd = [sys.executable, str(SERVER), "--port", "0", "--device", "cuda"]
    result = subprocess.run(cmd, env=server_env(model_dir), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --device cuda") and result.stderr.count("\n") == 1


def test_sigterm_stops_promptly_with_exit_0(tmp_path: Path) -> None:
    """Also covers a folder without an index (every *.safetensors is loaded) and an unused pad tensor."""
    make_model(tmp_path, pad_mb=1)
    (tmp_path / "model.safetensors.index.json").unlink()
    proc, base = start_server(tmp_path)
    try:
        status, info = request(f"{base}/v1/models")
        assert status == 200 and len(info["shards"]) == 3
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=5)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0, stderr
    finally:
        stop(proc)
    startup = stderr.splitlines()[0]
    assert "params=1476 (1,054,480 bytes in 3 shards)" in startup and "listening on http://127.0.0.1:" in startup


def test_sigterm_stops_it_as_pid_1(model_dir: Path) -> None:
    """As PID 1 of a PID namespace (a container) the kernel drops SIGTERM unless a handler is set."""
    unshare = shutil.which("unshare")
    if not unshare or subprocess.run([unshare, "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode:
        pytest.skip("cannot create a PID namespace here (needs unshare and privileges)")
    proc, _ = start_server(model_dir, prefix=[unshare, "--pid", "--fork"])
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        server_pid = int(children[0])
        nspids = next(
            line for line in Path(f"/proc/{server_pid}/status").read_text().splitlines() if line.startswith("NSpid:")
        )
        assert nspids.split()[-1] == "1"
        started = time.monotonic()
        os.kill(server_pid, signal.SIGTERM)
        proc.communicate(timeout=5)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0
    finally:
        stop(proc)
