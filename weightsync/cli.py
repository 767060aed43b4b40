"""Command line: parse flags and WEIGHTSYNC_* env vars, wire them to the engine, map errors to exit codes.

No logic lives here. A flag wins over its env var; every value is validated
with a one-line `weightsync: error:` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from weightsync import __version__
from weightsync.errors import UsageError, WeightsyncError

ENV_PREFIX = "WEIGHTSYNC_"
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one `weightsync: error:` line and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    choices: tuple[str, ...] = ()
    repeat: bool = False
    switch: bool = False
    required: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


def _int_between(low: int, high: int, what: str = "an integer") -> Callable[[str], int]:
    """A validator for an integer option within [low, high]."""
    def convert(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be {what} from {low} to {high}")
        return value

    return convert


_positive_int = _int_between(1, 512)
_attempts = _int_between(1, 100)
_keep = _int_between(0, 10000)
_port = _int_between(1, 65535, "a TCP port")


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan and inf
        raise ValueError("must be a finite number of seconds >= 0")
    return value


# -- hardening (issue 5): lock mode, lease, retries, stall timeout, gc, unknown env vars --------------------
def _timeout(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86400:  # also refuses nan and inf
        raise ValueError("must be a number of seconds above 0 and at most 86400")
    return value


TEST_ENV = ("WEIGHTSYNC_TEST_PAUSE_AT", "WEIGHTSYNC_TEST_PAUSE_SECONDS")  # see weightsync/testhooks.py


def _check_env() -> None:
    """A WEIGHTSYNC_* variable that no option reads is a typo that would silently do nothing: refuse it."""
    import difflib

    known = {option.env for option in ALL_OPTIONS.values()} | set(TEST_ENV)
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown environment variable {name}{hint} (see `weightsync COMMAND --help` for "
                             "the [env ...] of each option)")


HARDENING_OPTIONS = (
    Option("--lock-mode", "auto = flock where it excludes other processes, else a lease file; lease = always "
           "the lease (set it on every pod of a FUSE/object-store volume)", default="auto",
           choices=("auto", "flock", "lease")),
    Option("--lease-timeout", "lease mode: take over a lease whose heartbeat stopped this many seconds ago",
           _timeout, default=60.0),
    Option("--retries", "attempts per network request before exit 7", _attempts, default=6),
    Option("--retry-base", "first retry delay in seconds (doubles each retry, full jitter)", _seconds, default=0.5),
    Option("--keep", "gc: keep the N newest revisions of each model (`current`, refs/ and locked ones are "
           "always kept)", _keep, required=True),
    Option("--staging-older-than", "gc: remove abandoned staging untouched for this many seconds", _seconds,
           default=86400.0),
)


def _boolean(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


def _options(*flags: str) -> tuple[Option, ...]:
    return tuple(ALL_OPTIONS[flag] for flag in flags)


ALL_OPTIONS = {option.flag: option for option in (
    Option("--source", "s3://bucket/prefix, hf://owner/name[@rev], file:///abs/path or a directory"),
    Option("--dest", "the volume (directory) models are published into", required=True),
    Option("--name", "directory name of this model under DEST (default: derived from the source)"),
    Option("--revision", "branch, tag or commit (hf), or a revision id printed by a previous sync (pin)"),
    Option("--include", "only files matching this glob (repeatable; env: comma-separated)", repeat=True),
    Option("--exclude", "skip files matching this glob (repeatable; env: comma-separated)", repeat=True),
    Option("--verify", "warm-start check: fast = manifest + sizes, full = re-hash everything (and repair)",
           default="fast", choices=("fast", "full")),
    Option("--concurrency", "parallel ranged downloads", _positive_int, default=8),
    Option("--lock-timeout", "give up (exit 5) after waiting this long for another process's download",
           _seconds),
    Option("--offline", "make no network request: use what is already published", switch=True),
    Option("--require-checksum", "refuse (exit 4, before downloading) any file the source promises no usable "
           "checksum for, instead of checking its size only", switch=True),
    Option("--s3-addressing-style", "S3 URL style for S3-compatible servers", default="auto",
           choices=("auto", "path", "virtual")),
    Option("--stall-timeout", "retry a connection that sends nothing for this many seconds", _timeout,
           default=60.0),
    Option("--progress-interval", "seconds between progress lines when stderr is not a terminal", _seconds,
           default=10.0),
    Option("--log-format", "text lines, or one JSON object per event", default="text", choices=("text", "json")),
    Option("--lockfile", "download exactly what this `weightsync lock` file pins; exit 4 if the source differs"),
    Option("--termination-log", "where to write the Kubernetes termination message (default /dev/termination-log "
           "when it exists)"),
    Option("--metrics-textfile", "write Prometheus metrics here at the end (node_exporter textfile collector)"),
    Option("--pushgateway", "push Prometheus metrics to this Pushgateway URL at the end, also on failure", _url),
    Option("--metrics-port", "serve /metrics, /readyz and /healthz on this port (serve mode)", _port),
    Option("--ready-file", "serve mode: create this file once the model is published (for probes)"),
    Option("--recheck-interval", "serve mode: seconds between checks for a new revision (0 = never)", _seconds,
           default=300.0),
    Option("--skip-checks", "run: do not check safetensors shards and headers before exec", switch=True),
    Option("--require-gpu", "run/serve: fail (exit 2) unless a CUDA device is visible", switch=True),
    Option("--json", "status: print JSON instead of a table", switch=True),
    Option("--debug", "log details and show tracebacks", switch=True),
    *HARDENING_OPTIONS,
)}
SOURCE_FLAGS = ("--source", "--name", "--revision", "--include", "--exclude", "--s3-addressing-style")
SYNC_FLAGS = (*SOURCE_FLAGS, "--dest", "--verify", "--concurrency", "--lock-timeout", "--offline", "--require-checksum",
              "--stall-timeout", "--progress-interval", "--lockfile", "--termination-log", "--metrics-textfile",
              "--pushgateway", "--log-format", "--debug", "--lock-mode", "--lease-timeout", "--retries",
              "--retry-base")
COMMANDS: dict[str, tuple[str, str, tuple[Option, ...]]] = {
    "sync": ("sync and print the published model directory", "", _options(*SYNC_FLAGS)),
    "run": ("sync, check the model, then exec COMMAND with MODEL_DIR set",
            "weightsync run [options] -- COMMAND [ARGS...]", _options(*SYNC_FLAGS, "--skip-checks", "--require-gpu")),
    "serve": ("native-sidecar mode: sync, report ready, serve metrics, pick up new revisions", "",
              _options(*SYNC_FLAGS, "--metrics-port", "--ready-file", "--recheck-interval", "--require-gpu")),
    "verify": ("re-hash a published model against its manifest", "",
               _options(*SOURCE_FLAGS, "--dest", "--log-format", "--debug")),
    "lock": ("sync once and print a lockfile pinning the revision and every file's sha256", "",
             (*_options(*SOURCE_FLAGS, "--concurrency", "--stall-timeout", "--require-checksum", "--log-format",
                        "--debug"),
              replace(ALL_OPTIONS["--dest"], required=False,
                      help="keep the synced model on this volume (default: a temporary directory)"))),
    "status": ("the models, revisions, staging and lock holders on a volume", "",
               _options("--dest", "--json", "--log-format", "--debug")),
    "gc": ("remove old revisions nothing points at and abandoned staging (never `current` or a locked one)", "",
           _options("--dest", "--name", "--keep", "--staging-older-than", "--lock-mode", "--lease-timeout",
                    "--log-format", "--debug")),
}


def _add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for option in options:
        help_text = f"{option.help} [env {option.env}]"
        if option.switch:
            parser.add_argument(option.flag, action="store_const", const=True, default=None, help=help_text)
        elif option.repeat:
            parser.add_argument(option.flag, action="append", metavar="GLOB", help=help_text)
        else:
            parser.add_argument(option.flag, help=help_text, metavar=option.dest.upper(),
                                choices=option.choices or None)


def _resolve(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """Flag, else env var, else default; converted and validated."""
    values: dict[str, Any] = {}
    for option in options:
        raw = getattr(args, option.dest)
        origin = option.flag
        if raw is None and os.environ.get(option.env) is not None:
            raw, origin = os.environ[option.env], option.env
            if option.repeat:
                raw = [part.strip() for part in raw.replace("\n", ",").split(",") if part.strip()]
        if raw is None:
            if option.required:
                raise UsageError(f"{option.flag} is required (or set {option.env})")
            values[option.dest] = option.default
            continue
        try:
            if option.switch:
                value = raw if isinstance(raw, bool) else _boolean(raw)
            elif option.repeat:
                value = tuple(raw)
            else:
                value = option.convert(raw)
                if option.choices and value not in option.choices:
                    raise ValueError(f"must be one of {', '.join(option.choices)}")
                if isinstance(value, str) and not value.strip():
                    raise ValueError("must not be empty")
        except ValueError as exc:
            raise UsageError(f"invalid value {raw!r} for {origin}: {exc}") from None
        values[option.dest] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="weightsync", description="Sync model weights into a volume (verified, resumable, "
                     "locked, atomically published), then exec the inference server.")
    parser.add_argument("--version", action="version", version=f"weightsync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, usage, options) in COMMANDS.items():
        _add_options(commands.add_parser(name, help=help_text, usage=usage or None), options)
    return parser


def _early_value(argv: list[str], flag: str) -> str | None:
    """A flag's value before parsing, so even a parse error is logged in the chosen format."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    debug = "--debug" in argv or os.environ.get(ENV_PREFIX + "DEBUG", "").lower() in TRUE
    from weightsync.progress import setup_logging

    log_format = _early_value(argv, "--log-format") or os.environ.get(ENV_PREFIX + "LOG_FORMAT", "text")
    setup_logging(debug, "json" if log_format == "json" else "text")
    try:
        _check_env()
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            raise UsageError(f"a command is required: {', '.join(COMMANDS)}")
        if command and args.command != "run":
            raise UsageError(f"{args.command} takes no command after `--`; use `weightsync run ... -- COMMAND` "
                             "to start a server")
        from weightsync import commands

        values = _resolve(args, COMMANDS[args.command][2])
        return commands.dispatch(args.command, values, command)
    except WeightsyncError as exc:
        return _fail(f"weightsync: error: {exc}", exc.exit_code, debug, log_format)
    except KeyboardInterrupt:
        return _fail("weightsync: error: interrupted; rerun to resume where it stopped", 130, False, log_format)
    except Exception as exc:
        return _fail(f"weightsync: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a "
                     "traceback and report it)", 1, debug, log_format)


def _fail(line: str, code: int, debug: bool, log_format: str) -> int:
    """The one error line (or, with --log-format json, one `error` event); a traceback only under --debug."""
    from weightsync.progress import event, redact

    if debug:
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
    if log_format == "json":
        event("error", "%s", line, level=logging.ERROR, exit_code=code)
    else:
        print(redact(line), file=sys.stderr, flush=True)
    return code
