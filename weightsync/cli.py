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
from dataclasses import dataclass
from pathlib import Path
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


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 512:
        raise ValueError("must be an integer from 1 to 512")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0 or value != value:
        raise ValueError("must be a number of seconds >= 0")
    return value


def _boolean(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


SYNC_OPTIONS = (
    Option("--source", "s3://bucket/prefix, hf://owner/name[@rev], file:///abs/path or a directory", required=True),
    Option("--dest", "the volume (directory) models are published into", required=True),
    Option("--name", "directory name of this model under DEST (default: derived from the source)"),
    Option("--revision", "branch, tag or commit (hf), or a revision id printed by a previous sync (pin)"),
    Option("--include", "only files matching this glob (repeatable; env: comma-separated)", repeat=True),
    Option("--exclude", "skip files matching this glob (repeatable; env: comma-separated)", repeat=True),
    Option("--verify", "warm-start check: fast = manifest + sizes, full = re-hash everything",
           default="fast", choices=("fast", "full")),
    Option("--concurrency", "parallel ranged downloads", _positive_int, default=8),
    Option("--lock-timeout", "give up (exit 5) after waiting this long for another process's download",
           _seconds),
    Option("--offline", "make no network request: use what is already published", switch=True),
    Option("--s3-addressing-style", "S3 URL style for S3-compatible servers", default="auto",
           choices=("auto", "path", "virtual")),
    Option("--stall-timeout", "retry a connection that sends nothing for this many seconds", _seconds,
           default=60.0),
    Option("--progress-interval", "seconds between progress lines when stderr is not a terminal", _seconds,
           default=10.0),
    Option("--debug", "log details and show tracebacks", switch=True),
)
VERIFY_OPTIONS = tuple(o for o in SYNC_OPTIONS if o.flag in (
    "--source", "--dest", "--name", "--revision", "--include", "--exclude", "--s3-addressing-style", "--debug"))


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
    sync = commands.add_parser("sync", help="sync and print the published model directory")
    _add_options(sync, SYNC_OPTIONS)
    run = commands.add_parser("run", help="sync, then exec COMMAND with MODEL_DIR set",
                              usage="weightsync run [options] -- COMMAND [ARGS...]")
    _add_options(run, SYNC_OPTIONS)
    verify = commands.add_parser("verify", help="re-hash a published model against its manifest")
    _add_options(verify, VERIFY_OPTIONS)
    return parser


def _request(values: dict[str, Any]) -> Any:
    from weightsync.engine import SyncRequest
    from weightsync.sources import Selection

    offline = values.get("offline") or False
    if values["source"].startswith("hf://") and os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        offline = True
    return SyncRequest(
        source=values["source"], dest=Path(values["dest"]), name=values.get("name"),
        revision=values.get("revision"),
        selection=Selection(include=values.get("include") or (), exclude=values.get("exclude") or ()),
        verify=values.get("verify") or "fast", concurrency=values.get("concurrency") or 8,
        lock_timeout=values.get("lock_timeout"), offline=offline,
        addressing_style=values.get("s3_addressing_style") or "auto",
        stall_timeout=values.get("stall_timeout") or 60.0,
        progress_interval=values.get("progress_interval") if values.get("progress_interval") is not None else 10.0,
    )


def _sync(values: dict[str, Any]) -> Any:
    from weightsync.engine import Engine

    result = Engine(_request(values)).sync()
    logging.getLogger("weightsync").info("%s", result.summary())
    return result


def _verify(values: dict[str, Any]) -> int:
    from weightsync.engine import Engine
    from weightsync.errors import IntegrityError

    directory, problems = Engine(_request(values)).verify(values.get("revision"))
    if problems:
        raise IntegrityError(f"{directory} failed verification: " + "; ".join(problems))
    logging.getLogger("weightsync").info("verified %s: every file matches its manifest sha256", directory)
    print(directory)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    debug = "--debug" in argv or os.environ.get(ENV_PREFIX + "DEBUG", "").lower() in TRUE
    from weightsync.progress import redact, setup_logging

    setup_logging(debug)
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            raise UsageError("a command is required: sync, run or verify")
        if args.command == "verify":
            return _verify(_resolve(args, VERIFY_OPTIONS))
        values = _resolve(args, SYNC_OPTIONS)
        if args.command == "run" and not command:
            raise UsageError("run needs the server command after `--`, e.g. "
                             "`weightsync run --source ... --dest ... -- python -m server`")
        if args.command == "sync" and command:
            raise UsageError("sync takes no command; use `weightsync run ... -- COMMAND` to start a server")
        result = _sync(values)
        if args.command == "run":
            from weightsync.launch import exec_server

            exec_server(command, result.path)
        print(result.path, flush=True)
        return 0
    except WeightsyncError as exc:
        if debug:
            traceback.print_exc()
        print(redact(f"weightsync: error: {exc}"), file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("weightsync: error: interrupted; rerun to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(redact(f"weightsync: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a "
                     "traceback and report it)"), file=sys.stderr, flush=True)
        return 1
