"""The warm path stays light: no heavy module (weightsync/lazy.py) is imported where a warm start would load it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support.helpers import heavy_modules_loaded, modules_loaded, upload_model, weightsync
from weightsync.lazy import HEAVY, is_heavy

PACKAGE = Path(__file__).resolve().parent.parent / "weightsync"
# Not heavy (lazy.HEAVY), but a plain warm start needs none of them, and each costs a millisecond or more of a
# start that takes ~60: hashing (hashlib loads OpenSSL), locks and retries (a warm start takes no lock and makes
# no request), the signature and lockfile checks (only when asked for), nvidia-smi (only --require-gpu), shutil
# (bz2 and lzma with it; cli.terminal_columns gives argparse the width).
NOT_ON_A_PLAIN_WARM_START = ("hashlib", "subprocess", "shutil", "weightsync.locking", "weightsync.retry",
                             "weightsync.progress", "weightsync.signature", "weightsync.lockfile")

def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every import at module level, outside `if TYPE_CHECKING:`."""
    found: list[tuple[int, str]] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, node.module), *((node.lineno, f"{node.module}.{a.name}") for a in node.names)]
    return found


def test_no_light_module_imports_a_heavy_one_at_its_top():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        if is_heavy(module):
            continue  # a heavy module may import what it likes: nothing on the warm path imports it
        for line, imported in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if is_heavy(imported):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    assert not offenders, "import these inside the function that needs them (weightsync/lazy.py):\n" + "\n".join(
        offenders)


def test_every_declared_heavy_module_says_why():
    assert all(reason.strip() for reason in HEAVY.values())
    assert not is_heavy("weightsync.engine") and is_heavy("botocore.config") and not is_heavy("boto3x")


def test_help_imports_no_heavy_module(clean_env):
    code, heavy = heavy_modules_loaded("--help", env=clean_env)
    assert code == 0 and heavy == []


def published_folder(tmp_path: Path, env: dict[str, str], *flags: str) -> list[str]:
    """Sync a small folder model once; the arguments of its pinned warm start."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"w" * 100_000)
    args = ["sync", "--source", str(folder), "--dest", str(tmp_path / "v"), *flags]
    first = weightsync(*args, env=env, check=True)
    return [*args, "--revision", Path(first.stdout.splitlines()[-1]).name]


def test_a_pinned_warm_start_imports_no_heavy_module(tmp_path, clean_env):
    code, heavy = heavy_modules_loaded(*published_folder(tmp_path, clean_env), env=clean_env)
    assert code == 0 and heavy == []


def test_a_plain_pinned_warm_start_loads_only_what_it_needs(tmp_path, clean_env):
    code, modules = modules_loaded(*published_folder(tmp_path, clean_env, "--name", "m"), env=clean_env)
    assert code == 0 and sorted(modules.intersection(NOT_ON_A_PLAIN_WARM_START)) == []


def test_a_pinned_warm_start_from_s3_imports_neither_boto3_nor_the_transfer_machinery(s3_server, bucket, s3_env,
                                                                                      tmp_path):
    upload_model(s3_server.client(), bucket, "warm", {"config.json": b"{}", "w.bin": b"x" * 200_000})
    dest = str(tmp_path / "v")
    first = weightsync("sync", "--source", f"s3://{bucket}/warm", "--dest", dest, env=s3_env, check=True)
    revision = Path(first.stdout.splitlines()[-1]).name
    code, heavy = heavy_modules_loaded("sync", "--source", f"s3://{bucket}/warm", "--dest", dest, "--revision",
                                       revision, env=s3_env)
    assert code == 0 and heavy == []


def test_a_gcs_pinned_warm_start_imports_nothing_heavy_and_an_emulator_sync_no_google_auth(gcs_server, gcs_bucket,
                                                                                          gcs_env, tmp_path):
    for name, data in {"config.json": b"{}", "w.bin": b"x" * 200_000}.items():
        gcs_server.upload(gcs_bucket, f"warm/{name}", data)
    args = ["sync", "--source", f"gs://{gcs_bucket}/warm", "--dest", str(tmp_path / "v")]
    code, cold = modules_loaded(*args, env=gcs_env)
    assert code == 0 and not any(m == "google.auth" or m.startswith("google.auth.") for m in cold), \
        "no credentials are needed for an emulator: google-auth stays unloaded"
    revision = Path(weightsync(*args, env=gcs_env, check=True).stdout.splitlines()[-1]).name
    code, heavy = heavy_modules_loaded(*args, "--revision", revision, env=gcs_env)
    assert code == 0 and heavy == []


def test_a_pinned_warm_start_from_an_oci_registry_imports_no_heavy_module(oci_registry, clean_env, tmp_path):
    env = {**clean_env, "DOCKER_CONFIG": str(tmp_path / "docker")}
    digest = oci_registry.push("acme/warm:v1", {"config.json": b"{}", "w.bin": b"x" * 200_000})
    pinned = ("sync", "--source", f"oci://{oci_registry.host}/acme/warm@{digest}", "--dest", str(tmp_path / "v"))
    weightsync(*pinned, env=env, check=True)
    code, heavy = heavy_modules_loaded(*pinned, env=env)
    assert code == 0 and heavy == []
