"""Prove tests/support/hubserver.py is a faithful Hub: drive it with huggingface_hub itself.

If the library can snapshot, resolve, list and map errors against the fake exactly
as it does against huggingface.co, weightsync tests built on the fake are meaningful.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Read at import time by huggingface_hub: set before importing it (configure_huggingface_hub patches too).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import httpx2  # noqa: E402  (huggingface_hub's own HTTP client)
import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import disable_progress_bars  # noqa: E402

from tests.support.hubserver import (  # noqa: E402
    DEFAULT_TOKEN,
    Faults,
    HubServer,
    configure_huggingface_hub,
    git_blob_sha1,
    lfs_pointer,
)

REPO = "acme/tiny-llm"
TOKEN = DEFAULT_TOKEN


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    """A running fake Hub, with huggingface_hub pointed at it and a private HF_HOME."""
    disable_progress_bars()
    with HubServer() as server, configure_huggingface_hub(server, tmp_path / "hf_home"):
        yield server


def _v1_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama", "hidden_size": 64}',
        "tokenizer.json": os.urandom(3000),  # >= 1024 bytes -> LFS by size
        "model-00001-of-00002.safetensors": os.urandom(70_000),
        "model-00002-of-00002.safetensors": os.urandom(50_000),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "nested/deeper/notes.txt": b"hello",
        "nested/empty.bin": b"",  # LFS by suffix, zero bytes
    }


def _populate(hub: HubServer) -> tuple[str, str, dict[str, bytes], dict[str, bytes]]:
    """Two commits on main (v1 tagged): modify, add and delete between them."""
    v1 = _v1_files()
    c1 = hub.add_commit(REPO, v1, message="v1 weights")
    hub.add_tag(REPO, "v1", c1)
    changes = {"config.json": b'{"model_type": "llama", "hidden_size": 128}', "extra/readme.md": b"# new"}
    c2 = hub.add_commit(REPO, changes, message="v2", delete=["model-00002-of-00002.safetensors"])
    v2 = {k: v for k, v in v1.items() if k != "model-00002-of-00002.safetensors"} | changes
    return c1, c2, v1, v2


def _read_tree(root: Path) -> dict[str, bytes]:
    """Files under root, skipping huggingface_hub's local_dir metadata folder."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".cache/"):
            out[rel] = p.read_bytes()
    return out


# ---------------------------------------------------------------------------- downloads


def test_snapshot_download_branch_tag_and_sha_with_forced_pagination(hub: HubServer, tmp_path: Path) -> None:
    c1, c2, v1, v2 = _populate(hub)
    hub.page_size = 2  # 8+ tree entries -> several pages the library must follow via Link

    for revision, expected in (("main", v2), ("v1", v1), (c1, v1), (c2, v2)):
        hub.reset_log()
        out = snapshot_download(REPO, revision=revision, local_dir=tmp_path / revision)
        assert _read_tree(Path(out)) == expected, revision
        tree_calls = hub.find_requests("GET", path_contains="/tree/")
        assert len(tree_calls) >= 4 and sum("cursor=" in r.query for r in tree_calls) == len(tree_calls) - 1
        assert all(r.status == 200 for r in tree_calls)
        # A sha is used as-is: no repo_info call. Branch/tag resolve through /revision/.
        info_calls = hub.find_requests("GET", path_contains="/revision/")
        assert len(info_calls) == (0 if revision in (c1, c2) else 1)


def test_snapshot_download_into_cache_and_dataset_repo(hub: HubServer, tmp_path: Path) -> None:
    files = {"train/part-0.parquet": b"PAR1" * 500, "README.md": b"# d"}
    commit = hub.add_commit("acme/data", files, repo_type="dataset")
    out = Path(snapshot_download("acme/data", repo_type="dataset", cache_dir=tmp_path / "cache"))
    assert out.name == commit  # snapshots/<commit sha>
    assert _read_tree(out) == files
    assert hub.find_requests("HEAD", path_prefix="/datasets/acme/data/resolve/")


def test_hf_hub_download_follows_lfs_redirect_to_cdn_without_token(hub: HubServer, tmp_path: Path) -> None:
    weights = os.urandom(200_000)
    commit = hub.add_commit(REPO, {"model.safetensors": weights, "config.json": b"{}"})
    sha256 = hashlib.sha256(weights).hexdigest()
    cache = tmp_path / "cache"

    path = hf_hub_download(REPO, "model.safetensors", cache_dir=cache, token=TOKEN)
    assert Path(path).read_bytes() == weights
    # The cache blob is named after X-Linked-Etag (sha256) -> the library read metadata off the 302.
    assert Path(path).resolve().name == sha256
    head = hub.find_requests("HEAD")[-1]
    assert head.status == 302 and head.authenticated
    cdn = hub.find_requests("GET", path_prefix="/cdn/lfs/")
    assert [r.status for r in cdn] == [200] and cdn[0].path == f"/cdn/lfs/{sha256}"
    assert not cdn[0].authenticated, "httpx must drop Authorization on the cross-origin CDN hop"
    assert not hub.find_requests("GET", path_contains="/resolve/"), "library GETs the Location directly"

    small = hf_hub_download(REPO, "config.json", cache_dir=cache)
    assert Path(small).resolve().name == git_blob_sha1(b"{}")  # non-LFS etag = git blob sha1
    assert Path(small).parent.name == commit


def test_big_file_streams_from_disk(hub: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    with src.open("wb") as fh:
        for _ in range(24):
            fh.write(os.urandom(1024 * 1024))
    hub.add_commit(REPO, {"big.safetensors": src})
    info = hub.file_info(REPO, "big.safetensors")
    assert info["size"] == 24 * 1024 * 1024 and info["lfs"]
    out = hf_hub_download(REPO, "big.safetensors", local_dir=tmp_path / "out")
    assert hashlib.sha256(Path(out).read_bytes()).hexdigest() == info["sha256"]


# ---------------------------------------------------------------------------- metadata


def test_tree_model_info_and_paths_info_report_true_sizes_and_hashes(hub: HubServer) -> None:
    _, c2, _, v2 = _populate(hub)
    hub.page_size = 3
    api = HfApi()

    def expected(path: str) -> tuple[int, str, str | None]:
        data = v2[path]
        lfs = len(data) >= 1024 or path.endswith((".safetensors", ".bin"))
        sha = hashlib.sha256(data).hexdigest()
        oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return len(data), oid, sha if lfs else None

    entries = list(api.list_repo_tree(REPO, recursive=True, expand=True))
    files = {e.path: e for e in entries if hasattr(e, "blob_id")}
    folders = {e.path for e in entries if not hasattr(e, "blob_id")}
    assert set(files) == set(v2) and folders == {"nested", "nested/deeper", "extra"}
    for path, entry in files.items():
        size, oid, sha = expected(path)
        assert (entry.size, entry.blob_id) == (size, oid), path
        assert (entry.lfs.sha256 if entry.lfs else None) == sha, path
        assert entry.last_commit is not None
    assert files["extra/readme.md"].last_commit.oid == c2
    assert files["nested/deeper/notes.txt"].last_commit.oid != c2  # untouched since v1
    assert len(hub.find_requests("GET", path_contains="/tree/")) == -(-len(entries) // 3)

    top = list(api.list_repo_tree(REPO, path_in_repo="nested"))
    assert [e.path for e in top] == ["nested/deeper", "nested/empty.bin"]

    assert huggingface_hub.model_info(REPO).sha == c2  # module-level helper also points at the fake
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == c2 and info.id == REPO and info.private is False and info.gated is False
    for sib in info.siblings:
        size, oid, sha = expected(sib.rfilename)
        assert (sib.size, sib.blob_id, sib.lfs.sha256 if sib.lfs else None) == (size, oid, sha)

    paths = api.get_paths_info(REPO, ["config.json", "nested", "model-00001-of-00002.safetensors", "missing"])
    assert [p.path for p in paths] == ["config.json", "nested", "model-00001-of-00002.safetensors"]
    assert paths[0].size == len(v2["config.json"]) and paths[0].lfs is None
    assert paths[2].lfs.sha256 == expected("model-00001-of-00002.safetensors")[2]
    assert paths[1].tree_id == next(e.tree_id for e in entries if e.path == "nested")


def test_revisions_tags_prs_and_refs(hub: HubServer) -> None:
    c1, c2, _, _ = _populate(hub)
    pr = hub.add_commit(REPO, {"config.json": b"{}"}, branch="refs/pr/1", base="main", message="PR")
    api = HfApi()
    assert api.model_info(REPO).sha == c2
    assert api.model_info(REPO, revision="v1").sha == c1
    assert api.model_info(REPO, revision=c1).sha == c1
    assert api.model_info(REPO, revision="refs/pr/1").sha == pr
    assert hub.find_requests(path_contains="/revision/refs%2Fpr%2F1")  # library URL-quotes the slash
    assert api.revision_exists(REPO, "v1") and api.revision_exists(REPO, c1)
    assert not api.revision_exists(REPO, "nope") and not api.revision_exists("acme/none", "main")
    assert str(api.resolve_revision(REPO, revision="main")) in ("main", c2)
    assert api.resolve_revision(REPO, revision="main").resolved == c2

    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", c2)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", c1)]
    assert [p.ref for p in refs.pull_requests or []] == ["refs/pr/1"]
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [c2, c1]

    # PR branch content: main's files + the PR change, downloadable via the quoted ref.
    assert Path(hf_hub_download(REPO, "config.json", revision="refs/pr/1")).read_bytes() == b"{}"


# ---------------------------------------------------------------------------- errors & auth


def test_error_mapping_matches_the_library(hub: HubServer) -> None:
    _populate(hub)
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("acme/missing")
    assert err.value.response.status_code == 401 and not isinstance(err.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info("acme/missing", token=TOKEN)
    assert err.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="does-not-exist")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="does-not-exist")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "nope.bin")
    with pytest.raises(RemoteEntryNotFoundError):
        api.list_repo_tree(REPO, path_in_repo="no/such/dir").__next__()
    assert not api.file_exists(REPO, "nope.bin") and api.file_exists(REPO, "config.json")


def test_private_and_gated_repos(hub: HubServer, tmp_path: Path) -> None:
    hub.add_commit("acme/secret", {"config.json": b"{}", "w.safetensors": b"x" * 4000})
    hub.set_access("acme/secret", private=True)
    hub.add_commit("acme/gated", {"config.json": b"{}"})
    hub.set_access("acme/gated", gated=True)
    api = HfApi()

    with pytest.raises(RepositoryNotFoundError) as err:
        snapshot_download("acme/secret", local_dir=tmp_path / "anon")
    assert not isinstance(err.value, GatedRepoError)
    out = snapshot_download("acme/secret", local_dir=tmp_path / "ok", token=TOKEN)
    assert _read_tree(Path(out)) == {"config.json": b"{}", "w.safetensors": b"x" * 4000}
    assert api.model_info("acme/secret", token=TOKEN).private is True

    # A wrong token is a 401 "Invalid credentials" (generic HTTP error), even on a public repo.
    hub.add_commit(REPO, {"a": b"1"})
    for repo in ("acme/secret", REPO):
        with pytest.raises(HfHubHTTPError) as err:
            api.model_info(repo, token="hf_wrong")
        assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)

    # Gated: metadata is public, content needs a token with access.
    assert api.model_info("acme/gated").gated == "auto"
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download("acme/gated", "config.json", cache_dir=tmp_path / "c1")
    assert err.value.response.status_code == 401
    assert Path(hf_hub_download("acme/gated", "config.json", token=TOKEN)).read_bytes() == b"{}"
    hub.tokens.add("hf_other")
    hub.set_access("acme/gated", allowed_tokens={TOKEN})
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download("acme/gated", "config.json", token="hf_other", cache_dir=tmp_path / "c2")
    assert err.value.response.status_code == 403

    assert all(TOKEN not in repr(r) and "hf_wrong" not in repr(r) for r in hub.requests)
    assert any(r.authenticated for r in hub.requests)


# ---------------------------------------------------------------------------- faults (raw HTTP)


def _cdn_location(hub: HubServer, path: str) -> str:
    r = httpx2.head(hub.resolve_url(REPO, path))
    assert r.status_code == 302
    assert r.headers["X-Linked-Etag"] == f'"{hub.file_info(REPO, path)["sha256"]}"'
    assert int(r.headers["X-Linked-Size"]) == hub.file_info(REPO, path)["size"]
    assert r.headers["X-Repo-Commit"] == hub.resolve_revision(REPO)
    return r.headers["Location"]


def test_range_requests_on_cdn_and_resolve(hub: HubServer) -> None:
    data = bytes(range(256)) * 40
    hub.add_commit(REPO, {"w.safetensors": data, "small.txt": b"0123456789"})
    loc = _cdn_location(hub, "w.safetensors")
    assert loc.startswith(hub.cdn_url + "/cdn/lfs/")

    r = httpx2.get(loc, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert httpx2.get(loc, headers={"Range": "bytes=-10"}).content == data[-10:]
    assert httpx2.get(loc, headers={"Range": "bytes=10000-"}).content == data[10000:]
    bad = httpx2.get(loc, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    assert httpx2.get(loc.replace("Signature=", "Signature=0")).status_code == 403

    small = httpx2.get(hub.resolve_url(REPO, "small.txt"), headers={"Range": "bytes=2-4"})
    assert small.status_code == 206 and small.content == b"234"
    assert small.headers["ETag"] == f'"{git_blob_sha1(b"0123456789")}"'
    followed = httpx2.get(hub.resolve_url(REPO, "w.safetensors"), follow_redirects=True)
    assert followed.content == data


def test_corrupt_drop_fail_stall_throttle_and_log(hub: HubServer, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    hub.add_commit(REPO, {"w.safetensors": data, "c.json": b'{"k": 1}'})

    hub.faults.corrupt = {"w.safetensors", f"{REPO}/c.json"}
    got = httpx2.get(hub.resolve_url(REPO, "w.safetensors"), follow_redirects=True)
    diff = [i for i in range(len(data)) if got.content[i] != data[i]]
    assert len(got.content) == len(data) and diff == [len(data) // 2]
    assert got.headers["Content-Length"] == str(len(data))  # headers still claim the real object
    small = httpx2.get(hub.resolve_url(REPO, "c.json")).content
    assert small != b'{"k": 1}' and len(small) == 8
    hub.faults = Faults()

    # drop_after_bytes: the socket closes mid-body; the library resumes with a Range request.
    hub.faults.drop_after_bytes, hub.faults.drop_times = 100_000, 1
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(_cdn_location(hub, "w.safetensors"))
    # fail_status: 503 + Retry-After once, then success.
    hub.faults = Faults(fail_status={"c.json": 503}, fail_times=1)
    first = httpx2.get(hub.resolve_url(REPO, "c.json"))
    assert first.status_code == 503 and first.headers["Retry-After"] == "1"
    assert httpx2.get(hub.resolve_url(REPO, "c.json")).content == b'{"k": 1}'
    hub.faults = Faults(fail_status={f"/api/models/{REPO}/revision": 500})
    assert httpx2.get(f"{hub.url}/api/models/{REPO}/revision/main").status_code == 500

    hub.faults = Faults(stall_seconds=0.3)
    t0 = time.monotonic()
    assert httpx2.get(hub.resolve_url(REPO, "c.json")).content == b'{"k": 1}'
    assert time.monotonic() - t0 >= 0.3
    hub.faults = Faults(throttle_bps=400_000, only_paths={"w.safetensors"})
    t0 = time.monotonic()
    assert httpx2.get(_cdn_location(hub, "w.safetensors")).content == data
    assert time.monotonic() - t0 >= 0.6

    hub.faults = Faults()
    hub.reset_log()
    hf_hub_download(REPO, "c.json", local_dir=tmp_path / "count")
    assert hub.wait_idle()
    assert [(r.method, r.status) for r in hub.requests] == [("HEAD", 200), ("GET", 200)]
    assert hub.requests[1].bytes_sent == 8


def test_library_recovers_from_dropped_connections(hub: HubServer, tmp_path: Path) -> None:
    """huggingface_hub reads 10 MiB chunks: it resumes with Range only from a chunk boundary."""
    mib = 1024 * 1024
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(12 * mib))
    small = os.urandom(300_000)
    hub.add_commit(REPO, {"w.safetensors": src, "s.safetensors": small})

    hub.faults = Faults(drop_after_bytes=100_000, drop_times=1)
    assert Path(hf_hub_download(REPO, "s.safetensors", local_dir=tmp_path / "a")).read_bytes() == small
    gets = hub.find_requests("GET", path_prefix="/cdn/")
    assert [(r.status, r.range_header, r.bytes_sent, r.dropped) for r in gets] == [
        (200, None, 100_000, True),
        (200, None, 300_000, False),  # nothing counted before the drop -> full restart
    ]

    hub.reset_log()
    hub.faults = Faults(drop_after_bytes=11 * mib, drop_times=1)
    out = hf_hub_download(REPO, "w.safetensors", local_dir=tmp_path / "b")
    assert Path(out).read_bytes() == src.read_bytes()
    gets = hub.find_requests("GET", path_prefix="/cdn/")
    assert [(r.status, r.range_header, r.bytes_sent) for r in gets] == [
        (200, None, 11 * mib),
        (206, f"bytes={10 * mib}-", 2 * mib),
    ]


def test_stop_releases_ports(tmp_path: Path) -> None:
    hub = HubServer().start()
    port = int(hub.url.rsplit(":", 1)[1])
    hub.add_commit(REPO, {"a": b"1"})
    with httpx2.Client() as client:  # keep-alive connection left open on purpose
        assert client.get(f"{hub.url}/api/models/{REPO}").status_code == 200
        hub.stop()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
