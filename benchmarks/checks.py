#!/usr/bin/env python3
"""What each check costs, and that a sync computes only the cheapest sound one.

    .venv/bin/python benchmarks/checks.py                 # ~6 min on 2 cores
    .venv/bin/python benchmarks/checks.py --gib 0.25 --reps 1 --baseline-ref ''   # smoke run

1. **Cost of each check.** weightsync's own `Verifier` (the code a sync runs) over
   `--gib` GiB of random bytes held in memory, fed in the 2 MiB windows the fetcher
   uses, `--reps` times: CPU-seconds per GiB (process time, one thread), and the
   extra over the sha256 every file gets anyway.
2. **A sync picks the cheapest.** 1 GiB objects uploaded four ways (single part with
   ChecksumSHA256, single part with CRC64NVME, boto3's default multipart CRC32
   COMPOSITE, multipart without checksum), each synced from SeaweedFS by the checkout
   and, with `--baseline-ref`, by the weightsync of that commit (default: the last
   one before the trust work), interleaved: client CPU-seconds per GiB and MB/s (min /
   median / max), and the evidence and digests the checkout reports.

The report goes to stdout and to benchmarks/results/<date>-checks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from run import ACCESS_KEY, BUCKET, PY, ROOT, SECRET_KEY, GiB, MiB, Servers, machine, measure  # noqa: E402

from weightsync.checksums import Evidence, Promise, Verifier  # noqa: E402

WINDOW = 2 * MiB
PART = 8 * MiB


def spread(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def check_costs(gib: float, reps: int) -> list[str]:
    size = int(gib * GiB) // PART * PART
    data = memoryview(os.urandom(size))
    parts = size // PART
    layout = tuple([PART] * parts)
    kinds = {
        "sha256 only (a full-object sha256 promise, LFS, lockfile)": Promise("sha256", "0" * 64, "x"),
        "crc64nvme": Promise("crc64nvme", "0" * 16, "x"),
        "crc32c": Promise("crc32c", "0" * 8, "x"),
        "crc32 (zlib)": Promise("crc32", "0" * 8, "x"),
        "crc32c composite, 8 MiB parts": Promise("crc32c", "0" * 8, "x", parts, layout),
        "crc32 composite, 8 MiB parts": Promise("crc32", "0" * 8, "x", parts, layout),
        "sha1 / git-sha1": Promise("sha1", "0" * 40, "x"),
        "sha256 composite, 8 MiB parts": Promise("sha256", "0" * 64, "x", parts, layout),
        "md5 (single-part ETag)": Promise("md5", "0" * 32, "x"),
        "multipart etag, 8 MiB parts": Promise("md5", "0" * 32, "ETag", parts, layout),
    }
    seconds: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(reps):
        for name, promise in kinds.items():  # interleaved: every kind once per repetition
            verifier = Verifier("bench", size, Evidence(promise))
            started = time.process_time()
            for offset in range(0, size, WINDOW):
                verifier.update(data[offset:offset + WINDOW])
            with contextlib.suppress(Exception):  # the value is a placeholder: only the cost is measured
                verifier.finish()
            seconds[name].append((time.process_time() - started) / (size / GiB))
    base = statistics.median(seconds[next(iter(kinds))])
    lines = [f"Each check over {size / GiB:g} GiB in memory, {reps} repetitions, one thread; CPU s/GiB min / "
             "median / max, and the median extra over the sha256 every file gets anyway.", "",
             "| check | CPU s/GiB (sha256 included) | extra over sha256 |", "|---|---|---|"]
    for name, values in seconds.items():
        extra = statistics.median(values) - base
        lines.append(f"| {name} | {spread(values)} | {max(0.0, extra):.2f} |")
    return lines


SHAPES = {
    "single part, ChecksumSHA256": {"Checksum": "SHA256", "multipart": False},
    "single part, CRC64NVME": {"Checksum": "CRC64NVME", "multipart": False},
    "multipart, boto3 default (CRC32 composite)": {"Checksum": "CRC32", "multipart": True},
    "multipart, no checksum (ETag only)": {"Checksum": None, "multipart": True},
}


def upload(servers: Servers, work: Path, size: int) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    data = os.urandom(size)
    plain = boto3.client("s3", endpoint_url=servers.s3.endpoint, aws_access_key_id=ACCESS_KEY,
                         aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                         config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"))
    path = work / "object.bin"
    path.write_bytes(data)
    for index, how in enumerate(SHAPES.values()):
        key = f"checks/{index}/model.safetensors"
        if how["multipart"]:
            client = servers.s3.client() if how["Checksum"] else plain
            client.upload_file(str(path), BUCKET, key, Config=TransferConfig(multipart_threshold=PART,
                                                                              multipart_chunksize=PART))
        else:
            plain.put_object(Bucket=BUCKET, Key=key, Body=data, ChecksumAlgorithm=how["Checksum"])
    path.unlink()


def export_ref(ref: str, into: Path) -> Path:
    """The weightsync package of `ref`, to run side by side with the checkout."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "weightsync"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def sync_costs(size: int, reps: int, baseline: str) -> list[str]:
    work = ROOT / ".bench" / "checks"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    servers = Servers(work, print)
    servers.start_s3()
    try:
        upload(servers, work, size)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEIGHTSYNC_"))}
        env.update(AWS_ENDPOINT_URL=servers.s3.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                   WEIGHTSYNC_S3_ADDRESSING_STYLE="path")
        versions = {"checkout": ROOT}
        if baseline:
            versions[f"baseline {baseline}"] = export_ref(baseline, work / "baseline")
        cpu: dict[tuple[str, str], list[float]] = {}
        rate: dict[tuple[str, str], list[float]] = {}
        reported: dict[tuple[str, str], tuple[str, str]] = {}
        runs = [(index, name, version, code) for index, name in enumerate(SHAPES) for version, code in versions.items()]
        for rep in range(-1, reps):  # rep -1 warms the server's cache and the interpreter's; it is not counted
            rotated = runs[max(rep, 0) % len(runs):] + runs[:max(rep, 0) % len(runs)]
            for index, name, version, code in rotated:
                dest = work / "dest"
                shutil.rmtree(dest, ignore_errors=True)
                out = work / "stdout.txt"
                run_env = {**env, "PYTHONPATH": str(code)}
                argv = [PY, "-m", "weightsync", "sync", "--source", f"s3://{BUCKET}/checks/{index}", "--dest",
                        str(dest), "--log-format", "json"]
                result = measure(argv, run_env, servers.s3_cpu, cwd=work, stdout_path=out)
                if not result.ok:
                    raise SystemExit(f"{version} {name}: {result.error}")
                if rep < 0:
                    continue
                cpu.setdefault((name, version), []).append(result.cpu / (size / GiB))
                rate.setdefault((name, version), []).append(size / result.wall / 1e6)
                if rep == 0:
                    events = [json.loads(line) for line in (ROOT / ".bench" / "last-stderr.txt").read_text()
                              .splitlines() if line.startswith("{")]
                    [shard] = [e for e in events if e["event"] == "file_verified"]
                    [published] = [e for e in events if e["event"] == "published"]
                    # An older weightsync reported no evidence: show what its summary claimed.
                    reported[(name, version)] = (shard.get("evidence") or f"claimed: {published['verification']}",
                                                 " + ".join(shard.get("computed") or ["not reported"]))
        lines = [f"One {size / GiB:g} GiB object per shape from SeaweedFS on loopback, {reps} repetitions "
                 "interleaved in a rotating order after one uncounted warm-up round; client CPU s/GiB (user+sys of the "
                 "process) and MB/s, min / median / max.", "",
                 "| upload | version | evidence reported | digests computed | CPU s/GiB | MB/s |",
                 "|---|---|---|---|---|---|"]
        for name in SHAPES:
            for version in versions:
                evidence, computed = reported[(name, version)]
                lines.append(f"| {name} | {version} | {evidence} | {computed} | {spread(cpu[(name, version)])} | "
                             f"{spread(rate[(name, version)], 0)} |")
        return lines
    finally:
        servers.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0, help="data per measurement (default 1 GiB)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline-ref", default="76d58db",
                        help="also sync with the weightsync of this commit ('' to skip)")
    parser.add_argument("--out", help="report file (default benchmarks/results/<date>-checks.md)")
    args = parser.parse_args()
    report = [f"# Cost of each check — {datetime.date.today().isoformat()}", "", *machine(), "",
              "## Each check on its own", "", *check_costs(args.gib, args.reps), "",
              "## What a sync computes", "", *sync_costs(int(args.gib * GiB), args.reps, args.baseline_ref)]
    text = "\n".join(report) + "\n"
    print(text)
    out = Path(args.out) if args.out else BENCH / "results" / f"{datetime.date.today().isoformat()}-checks.md"
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
