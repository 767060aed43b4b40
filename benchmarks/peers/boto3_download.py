"""The "well-tuned boto3" peer: download every object under a prefix with s3transfer.

Settings are the ones that measured fastest on the benchmark machine (benchmarks/README.md):
64 MiB parts, 16 threads, 1 MiB io chunks, the classic (pure Python) transfer client.
Like the other peers it verifies nothing end to end.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

MiB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--part-size", type=int, default=64, help="MiB")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--files-at-once", type=int, default=4)
    args = parser.parse_args()
    client = boto3.client("s3", config=Config(s3={"addressing_style": "path"},
                                              max_pool_connections=args.threads * args.files_at_once))
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=args.part_size * MiB,
                            max_concurrency=args.threads, io_chunksize=MiB, use_threads=True,
                            preferred_transfer_client="classic")
    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=args.bucket, Prefix=args.prefix.rstrip("/") + "/") for obj in page.get("Contents", [])]

    def download(key: str) -> None:
        target = os.path.join(args.dest, key[len(args.prefix.rstrip("/")) + 1:])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        client.download_file(args.bucket, key, target, Config=config)

    with ThreadPoolExecutor(max_workers=args.files_at_once) as pool:
        list(pool.map(download, keys))


if __name__ == "__main__":
    main()
