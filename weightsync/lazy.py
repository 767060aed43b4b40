"""The heavy imports, declared in one place: what a warm start and `--help` must never load.

A pod's start on a published model is a manifest read and a few `lstat`s; importing
boto3 alone would cost more than all of it. So every module below is imported only
inside the function that needs it (the cold path: listing, downloading, metrics,
progress bars on a TTY), never at the top of a module that the warm path loads.
tests/test_lazy_imports.py enforces both halves: no light module imports one of
these at its top, and a pinned warm start and `--help` end with none of them in
`sys.modules`.

To add a heavy dependency, name it here with the reason it is heavy.
"""

from __future__ import annotations

HEAVY: dict[str, str] = {
    "weightsync.sources.s3api": "the S3 client: xml.etree, configparser, hmac (~10 ms)",
    "weightsync.sources.connections": "the sources' HTTP connections: http.client, ssl, urllib (~15 ms)",
    "boto3": "tests and benchmarks only; weightsync's S3 client is sources/s3api.py",
    "botocore": "the credential chain of last resort (SSO profiles), in sources/s3api.py",
    "azure": "azure-identity's DefaultAzureCredential (msal, cryptography: ~0.3 CPU s to import), only for an "
             "az:// source with no key, SAS or connection string; azure-storage-blob: tests only",
    "huggingface_hub": "the Hub client (sources/hf.py), and httpx with it",
    "httpx": "the Hub's HTTP client",
    "google.auth": "Google credentials for gs:// (sources/gcs.py), only when a token is needed",
    "google.oauth2": "google-auth's service-account and user credentials, loaded by google.auth.default",
    "awscrt": "CRC32C / CRC64NVME checksums, only for a file promised one",
    "tqdm": "progress bars, only on a TTY",
    "prometheus_client": "metrics, only when asked for (--metrics-*, --pushgateway)",
    "filelock": "flock-mode locking, only when a download must be locked",
    "ctypes": "fallocate and sync_file_range for part files",
    "socket": "the lock holder's host name: a warm start takes no lock (~3 ms with selectors)",
    "tempfile": "only `weightsync lock` needs a scratch directory (~2 ms with random and shutil)",
    "concurrent.futures": "the describe step's thread pool",
    "weightsync.metrics": "only when metrics are asked for",
    "weightsync.mirror": "only `weightsync mirror`",
    "model_signing": "signature checks (~0.25 s: sigstore, pydantic, protobuf), only under a --trust-* policy",
    "cryptography": "reading trust keys and certificates, only under a --trust-* policy",
    "weightsync.fetch": "the transfer machinery: plan, workers",
    "weightsync.download": "one file's download: resume state, part file, running hash",
    "weightsync.partfile": "the part file and its system calls",
    "weightsync.resume": "resume state of partial downloads",
    "weightsync.resources": "cgroup limits and the worker plan",
}
"""Module -> why it stays off the warm path."""


def is_heavy(module: str) -> bool:
    """Whether `module` is one of HEAVY or inside one (`botocore.config` is botocore)."""
    return any(module == name or module.startswith(name + ".") for name in HEAVY)
