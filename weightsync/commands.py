"""What each subcommand does with its validated options: wiring between the engine and its outputs.

cli.py parses; this module connects the engine to what surrounds a sync — the
published path on stdout, metrics, the Kubernetes termination message, the
pre-exec checks and the exec itself — without holding sync logic of its own.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from weightsync.config import AddressingStyle, Layout, LockMode, TransferConfig, VerifyMode
from weightsync.errors import IntegrityError, UsageError, WeightsyncError
from weightsync.logs import event, write_termination_message

if TYPE_CHECKING:
    from weightsync.engine import Engine, SyncRequest, SyncResult
    from weightsync.lockfile import Lockfile
    from weightsync.metrics import MetricsOptions, SyncMetrics
    from weightsync.signature import SignaturePolicy

TRUE = {"1", "true", "yes", "on"}
T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """Every option's validated value, as cli.py resolved it (flag, else env var, else default).

    A field a command has no option for keeps the default here (None: "not given"), so one type serves every
    command. The field names are the options' (`--stall-timeout` is `stall_timeout`); cli.py's test checks that
    every option has its field.
    """

    command: str = ""
    source: str | None = None
    fallback: tuple[str, ...] = ()
    dest: str | None = None
    name: str | None = None
    layout: Layout = "native"
    repo_id: str | None = None
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    lockfile: str | None = None
    rebind: bool = False
    verify: VerifyMode = "fast"
    require_checksum: bool = False
    signature: str | None = None
    trust_key: str | None = None
    trust_certificate: str | None = None
    trust_identity: str | None = None
    trust_issuer: str | None = None
    trust_root: str | None = None
    signature_ignore: tuple[str, ...] = ()
    concurrency: int | None = None
    offline: bool = False
    s3_addressing_style: AddressingStyle = "auto"
    stall_timeout: float | None = None
    no_progress_timeout: float | None = None
    retries: int | None = None
    retry_base: float | None = None
    lock_timeout: float | None = None
    lock_mode: LockMode = "auto"
    lease_timeout: float | None = None
    log_format: str = "text"
    progress_interval: float | None = None
    termination_log: str | None = None
    metrics_textfile: str | None = None
    pushgateway: str | None = None
    metrics_port: int | None = None
    debug: bool = False
    skip_checks: bool = False
    require_gpu: bool = False
    ready_file: str | None = None
    recheck_interval: float | None = None
    json: bool = False
    keep: int | None = None
    dry_run: bool = False
    staging_older_than: float | None = None
    to: str | None = None
    to_endpoint: str | None = None
    part_size: int | None = None

    @classmethod
    def of(cls, command: str, values: dict[str, object]) -> Options:
        """From cli.py's resolved values: None for a switch or repeat not given means off / none."""
        known = {item.name: item for item in fields(cls)}
        given = {name: value for name, value in values.items() if value is not None or known[name].default is None}
        return cls(command=command, **given)  # type: ignore[arg-type]  # validated by cli.py, one type per option


def dispatch(command: str, options: Options, server_command: list[str]) -> int:
    handlers: dict[str, Callable[[Options, list[str]], int]] = {
        "sync": run_sync, "run": run_sync, "serve": run_serve, "verify": run_verify, "lock": run_lock,
        "status": run_status, "gc": run_gc, "mirror": run_mirror,
    }
    return handlers[command](options, server_command)


def build_request(options: Options, dest: str | None = None) -> SyncRequest:
    """A SyncRequest from options; a --lockfile supplies source, revision and filters."""
    from weightsync.engine import SyncRequest
    from weightsync.sources import Selection, open_source

    lockfile = None
    if options.lockfile:
        from weightsync.lockfile import Lockfile

        lockfile = Lockfile.load(options.lockfile)
    source, revision, include, exclude = options.source, options.revision, options.include, options.exclude
    if lockfile:
        if source and _relock(options, source, lockfile):
            lockfile = lockfile.for_source(open_source(source, lockfile=lockfile).uri)
        elif source:
            wanted = open_source(source, lockfile=lockfile).uri  # as shown: without a presigned URL's query
            if wanted != open_source(lockfile.source, lockfile=lockfile).uri:
                hint = (f", or lock it to these files: `weightsync lock --source {wanted} --lockfile "
                        f"{lockfile.origin} > new.lock`" if _is_http(wanted) else "")
                raise UsageError(f"--source {wanted} differs from the source pinned in --lockfile {lockfile.origin} "
                                 f"({lockfile.source}); drop --source or regenerate the lockfile{hint}")
        if revision and revision != lockfile.revision:
            raise UsageError(f"--revision {revision} differs from --lockfile {lockfile.origin} "
                             f"({lockfile.revision}); drop --revision")
        source, revision, include, exclude = (lockfile.source, lockfile.revision or None, lockfile.include,
                                              lockfile.exclude)
    if not source:
        raise UsageError("--source is required (or set WEIGHTSYNC_SOURCE, or pass --lockfile)")
    fallbacks = _fallbacks(source, options.fallback, lockfile is not None)
    offline = options.offline
    hub_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE
    if source.startswith("hf://") and hub_offline:
        offline = True
    elif hub_offline and any(uri.startswith("hf://") for uri in fallbacks):  # the Hub is not to be asked
        event("fallback_skipped", "HF_HUB_OFFLINE is set: not falling back to %s",
              ", ".join(uri for uri in fallbacks if uri.startswith("hf://")))
        fallbacks = tuple(uri for uri in fallbacks if not uri.startswith("hf://"))
    signature = signature_policy(options)
    if lockfile and lockfile.signature and signature is None:
        raise UsageError(f"--lockfile {lockfile.origin} was made under a signature policy "
                         f"({lockfile.signature.get('policy', '?')}): pass the same --trust-* flags (and --signature, "
                         "if it was a file)")
    return SyncRequest(
        source=source, fallbacks=fallbacks, dest=Path(dest or _required(options.dest)), name=options.name,
        layout=options.layout,
        repo_id=options.repo_id, revision=revision,
        selection=Selection(include=tuple(include), exclude=tuple(exclude)), verify=options.verify,
        lock_timeout=options.lock_timeout, offline=offline, addressing_style=options.s3_addressing_style,
        lockfile=lockfile, lock_mode=options.lock_mode, require_checksum=options.require_checksum,
        rebind=options.rebind, transfer=transfer_config(options), signature=signature,
    )


def _relock(options: Options, source: str, lockfile: Lockfile) -> bool:
    """`weightsync lock --source https://host/base/ --lockfile other.lock`: lock that base URL to the files of a
    lockfile made from another source (a local copy of what the web server holds), checked against the bytes
    the server sends."""
    return options.command == "lock" and _is_http(source) and source != lockfile.source


def _is_http(source: str) -> bool:
    return source.split("://", 1)[0].lower() in ("http", "https")


def _fallbacks(source: str, given: tuple[str, ...], pinned_by_lockfile: bool) -> tuple[str, ...]:
    """--fallback URIs, each a source URI of its own (parsed now: a typo is exit 2 before any request), none
    repeating another. A lockfile pins one source's files and promises, so it takes no fallback."""
    if not given:
        return ()
    from weightsync.sources import open_source

    if pinned_by_lockfile:
        raise UsageError("--fallback does not apply with --lockfile: a lockfile pins one source's files and their "
                         "checksums; drop --fallback, or sync without --lockfile")
    seen = {open_source(source).uri: "--source"}
    for uri in given:
        try:
            canonical = open_source(uri).uri
        except UsageError as exc:  # the backends word it for --source: name the flag that was given
            raise UsageError(str(exc).replace("--source", "--fallback")) from None
        if canonical in seen:
            raise UsageError(f"--fallback {uri} names the same source as {seen[canonical]}; give each source once")
        seen[canonical] = f"--fallback {uri}"
    return tuple(given)


def signature_policy(options: Options) -> SignaturePolicy | None:
    flags = (options.signature, options.trust_key, options.trust_certificate, options.trust_identity,
             options.trust_issuer, options.trust_root, options.signature_ignore)
    if not any(flags):
        return None  # no policy asked for: signature.py is not even loaded
    from weightsync.signature import SignaturePolicy

    return SignaturePolicy.build(*flags)


def transfer_config(options: Options) -> TransferConfig:
    """The defaults (config.DEFAULTS) with what the command's options set; an option a command does not
    have (`lock` has no --retries) keeps its default."""
    from weightsync import config

    given = {name: getattr(options, name) for name in config.TransferConfig.names()
             if getattr(options, name, None) is not None}
    return replace(config.DEFAULTS, **given)


def _required(value: T | None) -> T:
    """A value cli.py guarantees for this command (a required option)."""
    assert value is not None
    return value


class Reporter:
    """Metrics and the termination message around one sync, on success and on failure."""

    def __init__(self, options: Options, engine: Engine) -> None:
        self.termination_log = options.termination_log
        self.metrics: SyncMetrics | None = None
        self.metrics_options: MetricsOptions | None = None
        if options.metrics_textfile or options.pushgateway or options.metrics_port:  # the module only when asked
            from weightsync.metrics import MetricsOptions, SyncMetrics

            self.metrics_options = MetricsOptions(textfile=options.metrics_textfile, pushgateway=options.pushgateway,
                                                  port=options.metrics_port)
            self.metrics = SyncMetrics(engine.source.kind, engine.volume.label)

    def sync(self, engine: Engine) -> SyncResult:
        started = time.monotonic()
        try:
            result = engine.sync()
        except BaseException as exc:
            self.failure(exc, time.monotonic() - started)
            raise
        if self.metrics:
            self.metrics.record_success(result)
            self.metrics.export(self.metrics_options)
        write_termination_message(self.termination_log, {"result": "success", **result.fields()})
        return result

    def failure(self, exc: BaseException, seconds: float) -> None:
        if self.metrics:
            self.metrics.record_failure(exc, seconds)
            self.metrics.export(self.metrics_options)
        code = getattr(exc, "exit_code", 1)  # a WeightsyncError's, or SIGTERM's 143
        if isinstance(exc, KeyboardInterrupt):
            code, exc = 130, Exception("interrupted; rerun to resume where it stopped")
        structured = exc.fields() if isinstance(exc, WeightsyncError) else {}
        write_termination_message(self.termination_log, {"result": "error", "exit_code": code,
                                                         "error": f"weightsync: error: {exc}", **structured})


def run_sync(options: Options, server_command: list[str]) -> int:
    """`sync` prints the published directory; `run` checks it and execs the server on it."""
    from weightsync.engine import Engine

    running = options.command == "run"
    if running:
        from weightsync.launch import check_command

        check_command(server_command)
    engine = Engine(build_request(options))
    reporter = Reporter(options, engine)
    if running and options.require_gpu:
        _guarded(reporter, _require_gpu)
    result = reporter.sync(engine)
    if running:
        from weightsync.launch import exec_server

        if not options.skip_checks:
            from weightsync.checks import check_model

            checked = _guarded(reporter, lambda: check_model(result.path, result.paths))
            event("model_checked", "checked before exec: %s", checked, path=str(result.path), checked=checked)
        else:
            event("model_checked", "not checked before exec (--skip-checks)", path=str(result.path), checked=None)
        exec_server(server_command, result.model_dir, hub_cache=engine.request.dest.absolute()
                    if result.cache_snapshot else None)
    print(result.model_dir, flush=True)
    return 0


def _require_gpu() -> None:
    from weightsync.checks import require_gpu

    require_gpu()


def _guarded(reporter: Reporter, check: Callable[[], T]) -> T:
    try:
        return check()
    except WeightsyncError as exc:
        reporter.failure(exc, 0.0)
        raise


def run_verify(options: Options, _: list[str]) -> int:
    """Re-hash a published model; without --source, the model (and its source) the volume records."""
    from weightsync.engine import Engine

    if not options.source:
        if options.include or options.exclude:
            raise UsageError("verify re-hashes a whole published revision: --include/--exclude only say which "
                             "model, together with --source; without --source, name it with --name")
        options = _recorded_model(options)
    engine = Engine(build_request(options))
    directory, problems, manifest = engine.verify(options.revision)
    if problems and problems[0].startswith("signature: "):  # the files are intact: a sync cannot repair a signer
        raise IntegrityError(f"{directory} failed verification: {problems[0]}")
    if problems:
        repair = shlex.join(["weightsync", "sync", "--source", engine.source.uri, "--dest", _required(options.dest),
                             *_model_flags(engine), *engine.request.selection.flags(), "--revision",
                             engine.source_revision_of(directory.name), "--verify", "full", *_trust_flags(options)])
        if getattr(engine.source, "is_set", False):  # an https:// base URL: its files are the lockfile's
            repair += " --lockfile <the lockfile it was synced with>"
        raise IntegrityError(f"{directory} failed verification: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                             + f" — repair it (only the damaged files are downloaded again, while the source "
                             f"still holds that revision) with `{repair}`")
    recorded = manifest.signature if manifest else None
    if engine.request.signature is not None:
        signed = f"; the signature verifies ({engine.request.signature.id})"
    elif recorded is not None:
        signed = (f"; its signature ({recorded.file}, signed by {recorded.signer}) was not re-checked: give the "
                  "--trust-* flags to re-check it")
    else:
        signed = ""
    event("verified", "verified %s: every file matches the sha256 its manifest recorded when it was published%s",
          directory, signed, path=str(directory), signature=recorded.to_json() if recorded else None)
    print(directory)
    return 0


def _trust_flags(options: Options) -> list[str]:
    """The --signature / --trust-* flags as given, for a command line the user is told to run."""
    flags = [("--signature", options.signature), ("--trust-key", options.trust_key),
             ("--trust-certificate", options.trust_certificate), ("--trust-identity", options.trust_identity),
             ("--trust-issuer", options.trust_issuer), ("--trust-root", options.trust_root)]
    return [*(part for flag, value in flags if value for part in (flag, value)),
            *(part for glob in options.signature_ignore for part in ("--signature-ignore", glob))]


def _model_flags(engine: Engine) -> list[str]:
    """How a command line names the model this engine syncs: --name, or the hub cache layout and its repo id."""
    if engine.hub_cache is not None:
        from weightsync.hfcache import repo_id_of

        return ["--layout", "hf-cache", "--repo-id", repo_id_of(engine.hub_cache.folder)]
    return ["--name", engine.volume.name]


def _recorded_model(options: Options) -> Options:
    """`options` with the name, source and filters the volume records for the model (its `current` manifest)."""
    from weightsync.layout import require_volume, volumes
    from weightsync.manifest import Manifest, ManifestError

    dest, name = Path(_required(options.dest)), options.name
    require_volume(dest)
    found = {volume.label: volume for volume in volumes(dest)}
    if name is not None and name not in found:
        raise UsageError(f"--dest {dest} has no model {name!r} (models: {', '.join(found) or 'none'})")
    if name is None:
        if len(found) != 1:
            listed = ", ".join(found) if found else "none"
            raise UsageError(f"--dest {dest} holds {len(found)} models ({listed}); pass --name to say which "
                             "to verify")
        name = next(iter(found))
    volume = found[name]
    revision = volume.current_revision() or next(iter(volume.revisions()), None)  # any: one name, one source
    try:
        if revision is None:
            raise ManifestError("nothing is published")
        manifest = Manifest.load(volume.manifest_path(revision))
    except ManifestError as exc:
        raise UsageError(f"cannot tell which source {volume.root} was synced from ({exc}); pass --source") from None
    recorded = replace(options, source=manifest.source, include=tuple(manifest.selection.get("include", ())),
                       exclude=tuple(manifest.selection.get("exclude", ())))
    if volume.in_hub_cache:
        from weightsync.hfcache import repo_id_of

        return replace(recorded, layout="hf-cache", repo_id=repo_id_of(volume.dest.name), name=None)
    return replace(recorded, name=name)


def run_lock(options: Options, _: list[str]) -> int:
    """Sync once (into a throwaway directory unless --dest is given) and print the lockfile."""
    import tempfile

    from weightsync.engine import Engine
    from weightsync.lockfile import Lockfile
    from weightsync.manifest import Manifest

    with tempfile.TemporaryDirectory(prefix="weightsync-lock-") as scratch:
        request = build_request(options, dest=options.dest or scratch)
        engine = Engine(request)
        result = engine.sync()
        manifest = Manifest.load(engine.volume.manifest_path(result.revision))
    revision = result.source_revision
    if engine.source.kind == "https":  # the id a sync from this lockfile publishes under: derived from the sha256s
        from weightsync.sources.https import content_revision

        revision = content_revision([(entry.path, entry.sha256) for entry in manifest.files])
    lockfile = Lockfile(source=engine.source.uri, revision=revision, files=tuple(manifest.files),
                        include=request.selection.include, exclude=request.selection.exclude,
                        signature=manifest.signature.to_json() if manifest.signature else None)
    sys.stdout.write(lockfile.to_json())
    return 0


def run_mirror(options: Options, _: list[str]) -> int:
    """Mirror the source into the S3 target; the target URI is the last stdout line."""
    from weightsync.mirror import MirrorRequest, mirror
    from weightsync.sources import Selection

    request = MirrorRequest(source=_required(options.source), to=_required(options.to), revision=options.revision,
                            selection=Selection(include=options.include, exclude=options.exclude),
                            addressing_style=options.s3_addressing_style, to_endpoint=options.to_endpoint,
                            transfer=transfer_config(options))
    started = time.monotonic()
    try:
        result = mirror(request)
    except BaseException as exc:
        code = getattr(exc, "exit_code", 1)
        structured = exc.fields() if isinstance(exc, WeightsyncError) else {}
        write_termination_message(options.termination_log, {"result": "error", "exit_code": code,
                                                            "error": f"weightsync: error: {exc}",
                                                            "seconds": round(time.monotonic() - started, 3),
                                                            **structured})
        raise
    write_termination_message(options.termination_log, {"result": "success", **result.fields()})
    print(result.target, flush=True)
    return 0


def run_gc(options: Options, _: list[str]) -> int:
    from weightsync.gc import collect

    return collect(Path(_required(options.dest)), keep=_required(options.keep),
                   staging_older_than=_required(options.staging_older_than), name=options.name,
                   lock_mode=options.lock_mode, lease_timeout=transfer_config(options).lease_timeout,
                   dry_run=options.dry_run)


def run_status(options: Options, _: list[str]) -> int:
    from weightsync.status import format_table, volume_status

    report = volume_status(Path(_required(options.dest)))
    print(json.dumps(report, indent=1) if options.json else format_table(report))
    return 0


def run_serve(options: Options, _: list[str]) -> int:
    from weightsync.engine import Engine
    from weightsync.serve import serve

    if options.require_gpu:
        _require_gpu()
    engine = Engine(build_request(options))
    return serve(engine, Reporter(options, engine), options)
