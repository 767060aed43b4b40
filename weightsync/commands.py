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
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from weightsync.config import TransferConfig
from weightsync.errors import IntegrityError, UsageError, WeightsyncError
from weightsync.logs import event, write_termination_message

TRUE = {"1", "true", "yes", "on"}


def dispatch(command: str, values: dict[str, Any], server_command: list[str]) -> int:
    handlers: dict[str, Callable[[dict[str, Any], list[str]], int]] = {
        "sync": run_sync, "run": run_sync, "serve": run_serve, "verify": run_verify, "lock": run_lock,
        "status": run_status, "gc": run_gc,
    }
    values["command"] = command
    return handlers[command](values, server_command)


def build_request(values: dict[str, Any], dest: str | None = None) -> Any:
    """A SyncRequest from options; a --lockfile supplies source, revision and filters."""
    from weightsync.engine import SyncRequest
    from weightsync.lockfile import Lockfile
    from weightsync.sources import Selection, open_source

    lockfile = Lockfile.load(values["lockfile"]) if values.get("lockfile") else None
    source = values.get("source")
    revision, include, exclude = values.get("revision"), values.get("include") or (), values.get("exclude") or ()
    if lockfile:
        if source and open_source(source).uri != open_source(lockfile.source).uri:
            raise UsageError(f"--source {source} differs from the source pinned in --lockfile {lockfile.origin} "
                             f"({lockfile.source}); drop --source or regenerate the lockfile")
        if revision and revision != lockfile.revision:
            raise UsageError(f"--revision {revision} differs from --lockfile {lockfile.origin} "
                             f"({lockfile.revision}); drop --revision")
        source, revision, include, exclude = lockfile.source, lockfile.revision, lockfile.include, lockfile.exclude
    if not source:
        raise UsageError("--source is required (or set WEIGHTSYNC_SOURCE, or pass --lockfile)")
    offline = bool(values.get("offline"))
    if source.startswith("hf://") and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE:
        offline = True
    return SyncRequest(
        source=source, dest=Path(dest or values["dest"]), name=values.get("name"), revision=revision,
        selection=Selection(include=tuple(include), exclude=tuple(exclude)),
        verify=values.get("verify") or "fast", lock_timeout=values.get("lock_timeout"), offline=offline,
        addressing_style=values.get("s3_addressing_style") or "auto", lockfile=lockfile,
        lock_mode=values.get("lock_mode") or "auto", require_checksum=bool(values.get("require_checksum")),
        rebind=bool(values.get("rebind")), transfer=transfer_config(values),
    )


def transfer_config(values: dict[str, Any]) -> TransferConfig:
    """The defaults (config.DEFAULTS) with what the command's options set; an option a command does not
    have (`lock` has no --retries) keeps its default."""
    from weightsync import config

    given = {name: values[name] for name in config.TransferConfig.names() if values.get(name) is not None}
    return replace(config.DEFAULTS, **given)


class Reporter:
    """Metrics and the termination message around one sync, on success and on failure."""

    def __init__(self, values: dict[str, Any], engine: Any) -> None:
        from weightsync.metrics import MetricsOptions

        self.options = MetricsOptions(textfile=values.get("metrics_textfile"),
                                      pushgateway=values.get("pushgateway"), port=values.get("metrics_port"))
        self.termination_log = values.get("termination_log")
        self.metrics = None
        if self.options.wanted:
            from weightsync.metrics import SyncMetrics

            self.metrics = SyncMetrics(engine.source.kind, engine.volume.name)

    def sync(self, engine: Any) -> Any:
        started = time.monotonic()
        try:
            result = engine.sync()
        except BaseException as exc:
            self.failure(exc, time.monotonic() - started)
            raise
        if self.metrics:
            self.metrics.record_success(result)
            self.metrics.export(self.options)
        write_termination_message(self.termination_log, {"result": "success", **result.fields()})
        return result

    def failure(self, exc: BaseException, seconds: float) -> None:
        if self.metrics:
            self.metrics.record_failure(exc, seconds)
            self.metrics.export(self.options)
        code = getattr(exc, "exit_code", 1)  # a WeightsyncError's, or SIGTERM's 143
        if isinstance(exc, KeyboardInterrupt):
            code, exc = 130, Exception("interrupted; rerun to resume where it stopped")
        structured = exc.fields() if isinstance(exc, WeightsyncError) else {}
        write_termination_message(self.termination_log, {"result": "error", "exit_code": code,
                                                         "error": f"weightsync: error: {exc}", **structured})


def run_sync(values: dict[str, Any], server_command: list[str]) -> int:
    """`sync` prints the published directory; `run` checks it and execs the server on it."""
    from weightsync.engine import Engine

    running = values["command"] == "run"
    if running:
        from weightsync.launch import check_command

        check_command(server_command)
    engine = Engine(build_request(values))
    reporter = Reporter(values, engine)
    if running and values.get("require_gpu"):
        _guarded(reporter, _require_gpu)
    result = reporter.sync(engine)
    if running:
        from weightsync.launch import exec_server

        if not values.get("skip_checks"):
            from weightsync.checks import check_model

            checked = _guarded(reporter, lambda: check_model(result.path))
            event("model_checked", "checked before exec: %s", checked, path=str(result.path), checked=checked)
        else:
            event("model_checked", "not checked before exec (--skip-checks)", path=str(result.path), checked=None)
        exec_server(server_command, result.path)
    print(result.path, flush=True)
    return 0


def _require_gpu() -> None:
    from weightsync.checks import require_gpu

    require_gpu()


def _guarded(reporter: Reporter, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except WeightsyncError as exc:
        reporter.failure(exc, 0.0)
        raise


def run_verify(values: dict[str, Any], _: list[str]) -> int:
    """Re-hash a published model; without --source, the model (and its source) the volume records."""
    from weightsync.engine import Engine

    if not values.get("source"):
        if values.get("include") or values.get("exclude"):
            raise UsageError("verify re-hashes a whole published revision: --include/--exclude only say which "
                             "model, together with --source; without --source, name it with --name")
        values = {**values, **_recorded_model(Path(values["dest"]), values.get("name"))}
    engine = Engine(build_request(values))
    directory, problems = engine.verify(values.get("revision"))
    if problems:
        repair = shlex.join(["weightsync", "sync", "--source", engine.source.uri, "--dest", values["dest"],
                             "--name", engine.volume.name, *engine.request.selection.flags(), "--revision",
                             engine.source_revision_of(directory.name), "--verify", "full"])
        raise IntegrityError(f"{directory} failed verification: " + "; ".join(problems[:5])
                             + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                             + f" — repair it (only the damaged files are downloaded again, while the source "
                             f"still holds that revision) with `{repair}`")
    event("verified", "verified %s: every file matches the sha256 its manifest recorded when it was published",
          directory, path=str(directory))
    print(directory)
    return 0


def _recorded_model(dest: Path, name: str | None) -> dict[str, Any]:
    """The name, source and filters a volume records for a model (from its `current` manifest)."""
    from weightsync.layout import ModelVolume, model_names, require_volume
    from weightsync.manifest import Manifest, ManifestError

    require_volume(dest)
    names = model_names(dest)
    if name is not None and name not in names:
        raise UsageError(f"--dest {dest} has no model {name!r} (models: {', '.join(names) or 'none'})")
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise UsageError(f"--dest {dest} holds {len(names)} models ({listed}); pass --name to say which "
                             "to verify")
        name = names[0]
    volume = ModelVolume(dest, name)
    revision = volume.current_revision() or next(iter(volume.revisions()), None)  # any: one name, one source
    try:
        if revision is None:
            raise ManifestError("nothing is published")
        manifest = Manifest.load(volume.manifest_path(revision))
    except ManifestError as exc:
        raise UsageError(f"cannot tell which source {volume.root} was synced from ({exc}); pass --source") from None
    return {"name": name, "source": manifest.source, "include": tuple(manifest.selection.get("include", ())),
            "exclude": tuple(manifest.selection.get("exclude", ()))}


def run_lock(values: dict[str, Any], _: list[str]) -> int:
    """Sync once (into a throwaway directory unless --dest is given) and print the lockfile."""
    from weightsync.engine import Engine
    from weightsync.lockfile import Lockfile
    from weightsync.manifest import Manifest

    with tempfile.TemporaryDirectory(prefix="weightsync-lock-") as scratch:
        request = build_request(values, dest=values.get("dest") or scratch)
        engine = Engine(request)
        result = engine.sync()
        manifest = Manifest.load(engine.volume.manifest_path(result.revision))
    lockfile = Lockfile(source=engine.source.uri, revision=result.source_revision, files=tuple(manifest.files),
                        include=request.selection.include, exclude=request.selection.exclude)
    sys.stdout.write(lockfile.to_json())
    return 0


def run_gc(values: dict[str, Any], _: list[str]) -> int:
    from weightsync.gc import collect

    return collect(Path(values["dest"]), keep=values["keep"], staging_older_than=values["staging_older_than"],
                   name=values.get("name"), lock_mode=values.get("lock_mode") or "auto",
                   lease_timeout=transfer_config(values).lease_timeout, dry_run=bool(values.get("dry_run")))


def run_status(values: dict[str, Any], _: list[str]) -> int:
    from weightsync.status import format_table, volume_status

    report = volume_status(Path(values["dest"]))
    print(json.dumps(report, indent=1) if values.get("json") else format_table(report))
    return 0


def run_serve(values: dict[str, Any], _: list[str]) -> int:
    from weightsync.engine import Engine
    from weightsync.serve import serve

    if values.get("require_gpu"):
        _require_gpu()
    engine = Engine(build_request(values))
    return serve(engine, Reporter(values, engine), values)
