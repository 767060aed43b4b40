#!/usr/bin/env python3
"""Is the AWS Common Runtime a faster engine for ranged GETs than boto3 + readinto? (It was not.)

    .venv/bin/pip install awscrt && .venv/bin/python benchmarks/crt_probe.py [--reps 3]

Downloads the 2 GiB benchmark object from a local SeaweedFS three ways, interleaved:
awscrt's S3Client writing the file itself (recv_filepath), awscrt's S3Client handing
parts to a Python on_body callback that pwrites them, and weightsync's own reader
(8 threads, 64 MiB ranged GETs through boto3, http.client readinto into a 256 KiB
buffer, pwrite). No hashing in any of them: this isolates the transfer engine.
Each runs in its own process; wall, CPU and peak RSS as in run.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench

CRT = """
import os, sys
from urllib.parse import urlparse
from awscrt import auth, http, io, s3
mode, target, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
group = io.EventLoopGroup(2)
bootstrap = io.ClientBootstrap(group, io.DefaultHostResolver(group))
credentials = auth.AwsCredentialsProvider.new_static(os.environ["AWS_ACCESS_KEY_ID"],
                                                     os.environ["AWS_SECRET_ACCESS_KEY"])
client = s3.S3Client(bootstrap=bootstrap, region="us-east-1", credential_provider=credentials,
                     tls_mode=s3.S3RequestTlsMode.DISABLED, part_size=8 << 20, throughput_target_gbps=target)
request = http.HttpRequest("GET", "/bench/big/model.safetensors",
                           http.HttpHeaders([("Host", f"{endpoint.hostname}:{endpoint.port}")]))
fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
def on_body(chunk, offset, **_):
    os.pwrite(fd, chunk, offset)
extra = {"recv_filepath": out} if mode == "file" else {"on_body": on_body}
client.make_request(type=s3.S3RequestType.GET_OBJECT, request=request, **extra).finished_future.result()
"""

BOTO = """
import os, sys, threading
sys.path.insert(0, sys.argv[2])
from weightsync.sources.s3 import S3Source
out = sys.argv[1]
source = S3Source.from_uri("s3://bench/big", addressing_style="path", concurrency=8)
from weightsync.sources import Selection
file = source.snapshot(None, Selection()).files[0]
fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, file.size)
ranges = [(s, min(s + (64 << 20), file.size)) for s in range(0, file.size, 64 << 20)]
lock = threading.Lock()
def work():
    buffer = memoryview(bytearray(256 << 10))
    while True:
        with lock:
            if not ranges:
                return
            start, end = ranges.pop(0)
        reader = source.open_range(file, start, end)
        position = start
        while position < end:
            count = reader.readinto(buffer[:min(len(buffer), end - position)])
            os.pwrite(fd, buffer[:count], position)
            position += count
        reader.close()
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    try:
        import awscrt  # noqa: F401
    except ImportError:
        print("awscrt is not installed: .venv/bin/pip install awscrt")
        return 1

    def log(message: str) -> None:
        print(message, flush=True)

    bench.BENCH_WORK.mkdir(exist_ok=True)
    work = bench.BENCH_WORK / "crt"
    shutil.rmtree(work, ignore_errors=True)
    servers = bench.Servers(work, log)
    out = work / "out.bin"
    variants = {
        "awscrt S3Client, recv_filepath, target 10 Gbps": [bench.PY, "-c", CRT, "file", "10", str(out)],
        "awscrt S3Client, recv_filepath, target 1 Gbps": [bench.PY, "-c", CRT, "file", "1", str(out)],
        "awscrt S3Client, on_body + pwrite, target 10 Gbps": [bench.PY, "-c", CRT, "body", "10", str(out)],
        "weightsync reader (boto3, 8 x 64 MiB, readinto)": [bench.PY, "-c", BOTO, str(out), str(bench.ROOT)],
    }
    results: dict[str, list[bench.Run]] = {name: [] for name in variants}
    try:
        servers.start_s3()
        shape = bench.shapes(1.0)["big"]
        servers.upload(shape, to_s3=True, to_hub=False)
        env = bench.environment(servers, work / "home")
        for _ in range(args.reps):
            for name, argv in variants.items():
                out.unlink(missing_ok=True)
                run = bench.measure(argv, env, servers.s3_cpu)
                results[name].append(run)
                log(f"  {name}: {run.wall:.2f} s cpu {run.cpu:.2f} s rss {run.rss_mb:.0f} MB"
                    + ("" if run.ok else f" FAILED {run.error}"))
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n1 x 2 GiB, no hashing, {args.reps} interleaved reps, load {bench.load()}\n")
    print("| engine | median wall s | MB/s | CPU s | server CPU s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        good = sorted((r for r in runs if r.ok), key=lambda r: r.wall)
        if not good:
            print(f"| {name} | failed | | | | |")
            continue
        mid = good[len(good) // 2]
        print(f"| {name} | {mid.wall:.2f} | {shape.total / mid.wall / 1e6:.0f} | "
              f"{sorted(r.cpu for r in good)[len(good) // 2]:.2f} | "
              f"{sorted(r.server_cpu for r in good)[len(good) // 2]:.2f} | {max(r.rss_mb for r in good):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
