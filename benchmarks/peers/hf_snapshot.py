"""The Hugging Face peer: `huggingface_hub.snapshot_download(local_dir=...)` with its defaults.

HF_ENDPOINT points it at the benchmark's local Hub server; Xet is off (the local server
speaks plain HTTP + LFS, like weightsync's path). It checks sizes, not hashes.
"""

from __future__ import annotations

import sys

from huggingface_hub import snapshot_download

if __name__ == "__main__":
    repo_id, local_dir = sys.argv[1], sys.argv[2]
    print(snapshot_download(repo_id, local_dir=local_dir))
