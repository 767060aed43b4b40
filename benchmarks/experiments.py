#!/usr/bin/env python3
"""A/B the engine's design choices: each variant is weightsync with one knob changed.

    .venv/bin/python benchmarks/experiments.py --shape big --reps 5 \\
        default verify=off fsync=off writeback=off prealloc=off direct=off \\
        readback=pread chunk_mib=16 buffer_kib=4096 concurrency=4 --baseline-ref <commit>

A variant is a space-free list of comma-separated knobs (benchmarks/variant.py lists
them; `concurrency=N` is the CLI flag), or `default`. `--baseline-ref REF` adds
the weightsync package as it was at git REF (exported aside with `git archive`; nothing
in the checkout changes). Variants run interleaved,
rotating the order each repetition; the table shows medians. The numbers in benchmarks/README.md came from here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench


def variant_argv(variant: str, code: Path | None, shape: bench.Shape, dest: Path, source: str) -> list[str]:
    sync = ["sync", "--source", f"{source}/{shape.name}", "--dest", str(dest)]
    if variant.startswith("baseline@"):
        return [bench.PY, str(bench.BENCH / "variant.py"), f"--code={code}", "--", *sync]
    knobs = [] if variant == "default" else variant.split(",")
    flags = []
    for knob in list(knobs):
        if knob.startswith("concurrency="):
            flags += ["--concurrency", knob.split("=", 1)[1]]
            knobs.remove(knob)
    return [bench.PY, str(bench.BENCH / "variant.py"), *knobs, "--", *sync, *flags]


def export(ref: str, into: Path) -> Path:
    """The weightsync package as it was at `ref`, whole: since the transfer path was split into several modules
    (fetch, download, partfile, resume, config), no single file can go back in time on its own."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "weightsync"], cwd=bench.ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--shape", default="big", help="big, shards, rss-4g or rss-40x100m")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline-ref", help="also run the weightsync package of this git ref")
    parser.add_argument("--hf", action="store_true", help="sync from the local Hub instead of S3")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, flush=True)

    bench.BENCH_WORK.mkdir(exist_ok=True)
    work = bench.BENCH_WORK / "experiments"
    shutil.rmtree(work, ignore_errors=True)
    shape = {**bench.shapes(args.scale), **bench.rss_shapes(args.scale)}[args.shape]
    variants = list(args.variants)
    code = None
    if args.baseline_ref:
        code = export(args.baseline_ref, work / "baseline")
        variants.append(f"baseline@{args.baseline_ref}")
    servers = bench.Servers(work, log)
    try:
        if args.hf:
            servers.start_hub()
        else:
            servers.start_s3()
        servers.upload(shape, to_s3=not args.hf, to_hub=args.hf)
        env = bench.environment(servers, work / "home")
        source = "hf://bench" if args.hf else f"s3://{bench.BUCKET}"
        tools = [bench.Tool(v, v, "", lambda s, d, v=v: variant_argv(v, code, s, d, source),
                            kind="hf" if args.hf else "s3", is_weightsync=True, output=bench._published)
                 for v in variants]
        cells = bench.cold(servers, [shape], tools, args.reps, env, log)
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{shape.describe()} from {'the local Hub' if args.hf else 'SeaweedFS'}, {args.reps} interleaved reps, "
          f"load {bench.load()}")
    print()
    print("| variant | median wall s | MB/s | min wall s | CPU s | server CPU s | peak RSS MB | ok |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells:
        walls = [r.wall for r in cell.good]
        print(f"| {cell.tool.name} | {cell.median('wall'):.2f} | {cell.mb_per_s:.0f} | "
              f"{min(walls, default=float('nan')):.2f} | {cell.median('cpu'):.2f} | {cell.median('server_cpu'):.2f} | "
              f"{max((r.rss_mb for r in cell.good), default=float('nan')):.0f} | {len(cell.good)}/{len(cell.runs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
