"""Command line: parse flags and WEIGHTSYNC_* env vars, wire them to the engine, map errors to exit codes.

No logic lives here. A flag wins over its env var; every value is validated
with a one-line `weightsync: error:` and exit 2. The parser teaches: no silent
abbreviations, a "did you mean" for a mistyped flag or variable, defaults and
choices in `--help`, and a hint when a server command is missing its `--`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn, get_args

from weightsync import __version__
from weightsync.config import DEFAULTS, AddressingStyle, Layout, LockMode, VerifyMode
from weightsync.errors import UsageError, WeightsyncError

ENV_PREFIX = "WEIGHTSYNC_"
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def terminal_columns() -> int:
    """`shutil.get_terminal_size().columns` (COLUMNS, else the terminal on stdout, else 80), without importing
    shutil: it loads bz2 and lzma, ~1.5 ms of every start, and argparse asks for the width at every option."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; the width argparse's own formatter would choose, found by `terminal_columns`."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            kwargs["width"] = terminal_columns() - 2  # what argparse.HelpFormatter does with shutil's answer
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one `weightsync: error:` line and exit 2, and flags are never abbreviated
    (`--conc` silently meaning `--concurrency` is fragile in a manifest that outlives the next new flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _StoreOnce(argparse.Action):
    """A single-valued flag given twice with two values is a mistake in a manifest: refuse it, do not take the
    last one silently."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None and before != values:
            parser.error(f"{option_string} is given twice ({before!r} and {values!r}); give it once")
        setattr(namespace, self.dest, values)


@dataclass(frozen=True)
class Option:
    """One option: its flag, env var, conversion, default and how `--help` shows it."""

    flag: str
    help: str
    convert: Callable[[str], Any] = str
    default: Any = None
    choices: tuple[str, ...] = ()
    repeat: bool = False
    switch: bool = False
    required: bool = False
    group: str = "options"
    shown_default: str | None = None  # how --help states a default that is not a plain value
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def help_text(self) -> str:
        default = self.shown_default
        if default is None and self.default is not None and not self.switch:
            default = f"{self.default:g}" if isinstance(self.default, float) else str(self.default)
        parts = [self.help]
        if self.required:
            parts.append("(required)")
        elif default:
            parts.append(f"(default: {default})")
        return " ".join(parts) + f" [env {self.env}]"


def _int_between(low: int, high: int, what: str = "an integer") -> Callable[[str], int]:
    """A validator for an integer option within [low, high]."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"must be {what} from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"must be {what} from {low} to {high}")
        return value

    return convert


_positive_int = _int_between(1, 512)
_attempts = _int_between(1, 100)
_keep = _int_between(0, 10000)
_port = _int_between(1, 65535, "a TCP port")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("must be a number of seconds") from None


def _seconds(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):  # also refuses nan and inf
        raise ValueError("must be a finite number of seconds >= 0")
    return value


def _timeout(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 86400:  # also refuses nan and inf
        raise ValueError("must be a number of seconds above 0 and at most 86400")
    return value


def _boolean(text: str) -> bool:
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _mebibytes(text: str) -> int:
    """A part size in MiB, as bytes: S3's parts are 5 MiB to 5 GiB."""
    return _int_between(5, 5120, "a number of MiB")(text) << 20


def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


# -- environment ---------------------------------------------------------------------------------------------
TEST_ENV = ("WEIGHTSYNC_TEST_PAUSE_AT", "WEIGHTSYNC_TEST_PAUSE_SECONDS")  # see weightsync/testhooks.py
CREDENTIAL_ENV = ("WEIGHTSYNC_HTTP_TOKEN",)  # the https:// source's bearer token (sources/https.py), not an option

# Kubernetes gives every container variables for each Service in its namespace (enableServiceLinks, on by
# default): <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<PORT NAME>], <NAME>_PORT and
# <NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR] (kubelet's envvars.FromServices). A Service called `weightsync`
# or `weightsync-llama` (the chart names its Service after the release) makes them start with WEIGHTSYNC_.
# They are the cluster's, not typos: recognised by name *and* value, so a real typo is still refused.
_PROTOCOL = r"(?:tcp|udp|sctp)"
_SERVICE_LINK_VALUE = {  # patterns, compiled by `re` (and cached) the first time a name has a service link's shape
    "host": r"^[0-9A-Fa-f.:]+$",
    "port": r"^\d{1,5}$",
    "url": rf"^{_PROTOCOL}://[0-9A-Fa-f.:\[\]]+:\d{{1,5}}$",
    "proto": rf"^{_PROTOCOL}$",
}
_SERVICE_LINK_NAME = (
    (r"_SERVICE_HOST$", "host"),
    (r"_SERVICE_PORT(?:_[A-Z0-9_]+)?$", "port"),
    (r"_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_PROTO$", "proto"),
    (r"_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_PORT$", "port"),
    (r"_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_ADDR$", "host"),
    (r"_PORT(?:_\d{1,5}_(?:TCP|UDP|SCTP))?$", "url"),
)


def is_service_link(name: str, value: str) -> bool:
    """Whether NAME=VALUE has the shape of a variable Kubernetes injects for a Service."""
    if "_PORT" not in name and not name.endswith("_SERVICE_HOST"):
        return False  # what every name pattern above needs: WEIGHTSYNC_DEST and the like compile none of them
    return any(re.search(pattern, name) and re.match(_SERVICE_LINK_VALUE[kind], value)
               for pattern, kind in _SERVICE_LINK_NAME)


def _env_value(name: str) -> str | None:
    """An option's env var, unless it is a service link that happens to share its name (a Service called
    `weightsync-metrics` sets WEIGHTSYNC_METRICS_PORT=tcp://10.0.0.7:9400)."""
    value = os.environ.get(name)
    return None if value is None or is_service_link(name, value) else value


def _check_env() -> None:
    """A WEIGHTSYNC_* variable that no option reads is a typo that would silently do nothing: refuse it."""
    known = {option.env for option in ALL_OPTIONS.values()} | set(TEST_ENV) | set(CREDENTIAL_ENV)
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known and not is_service_link(name, os.environ[name]):
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown environment variable {name}{hint} (see `weightsync COMMAND --help` for "
                             "the [env ...] of each option)")


# -- options ---------------------------------------------------------------------------------------------------
WHAT, VERIFY, NETWORK, LOCKING, OUTPUT = ("the model", "verification", "network and speed", "locking",
                                          "logs and metrics")
GLOBAL_FLAGS = ("--log-format", "--debug")  # also accepted before the command

ALL_OPTIONS = {option.flag: option for option in (
    Option("--source", "s3://bucket/prefix, hf://owner/name[@rev], gs://bucket/prefix, az://account/container/prefix "
           "(or https://ACCOUNT.blob.core.windows.net/container/prefix), oci://registry/repo[:tag|@sha256:digest], "
           "https://host/path/file[#sha256=HEX], https://host/base/ with --lockfile, file:///abs/path or a "
           "directory; required unless --lockfile names it", group=WHAT, metavar="URI"),
    Option("--fallback", "another source of the same model, tried in order when --source (or the fallback "
           "before it) is unreachable, lacks the revision or is denied; each revision comes whole from one "
           "source (repeatable; env: comma-separated)", repeat=True, group=WHAT, metavar="URI"),
    Option("--dest", "the volume (directory) models are published into", required=True, group=WHAT, metavar="DIR"),
    Option("--name", "directory of this model under DEST; one name holds one source and filter set",
           shown_default="derived from the source", group=WHAT),
    Option("--revision", "branch, tag or commit (hf), tag or sha256:digest (oci), or a revision id printed by a "
           "previous sync (pin)", shown_default="the latest; main for hf://, latest for oci://", group=WHAT),
    Option("--include", "only files matching this glob (repeatable; env: comma-separated)", repeat=True,
           group=WHAT),
    Option("--exclude", "skip files matching this glob (repeatable; env: comma-separated)", repeat=True,
           group=WHAT),
    Option("--layout", "native: DEST/NAME/revisions/<rev> and DEST/NAME/current; hf-cache: DEST is a Hugging Face "
           "hub cache (point HF_HUB_CACHE at it), the model lands in models--OWNER--NAME/snapshots/<commit> and "
           "servers load it by repo id, offline", default="native", choices=get_args(Layout), group=WHAT),
    Option("--repo-id", "with --layout hf-cache, the repo id (OWNER/NAME) to cache the model under; required for "
           "every source but hf:// (their revision id is the commit)",
           shown_default="the hf:// source's, or --fallback's", group=WHAT, metavar="OWNER/NAME"),
    Option("--lockfile", "download exactly what this `weightsync lock` file pins; exit 4 if the source differs",
           group=WHAT, metavar="FILE"),
    Option("--rebind", "let --name switch to a different source or filter set than it serves now (pods "
           "reading DEST/NAME/current then load the new one)", switch=True, group=WHAT),
    Option("--verify", "warm-start check: fast = manifest + sizes, full = re-hash everything (and repair what "
           "is damaged)", default="fast", choices=get_args(VerifyMode), group=VERIFY),
    Option("--require-checksum", "refuse (exit 4, before downloading) any file the source promises no usable "
           "checksum for, instead of checking its size only", switch=True, group=VERIFY),
    Option("--signature", "which OpenSSF model-signing bundle to check before publishing, under a --trust-* "
           "policy (one of --trust-key, --trust-certificate, --trust-identity with --trust-issuer; needs "
           "weightsync[signing]): auto = the model.sig at the source, PATH = a bundle on this machine; exit 4 if "
           "it does not verify", shown_default="auto once a --trust-* policy is given", group=VERIFY,
           metavar="PATH|auto"),
    Option("--trust-key", "trust signatures made with this public key (PEM)", group=VERIFY, metavar="PEM"),
    Option("--trust-certificate", "trust signatures whose certificate chains to this CA (PEM)", group=VERIFY,
           metavar="PEM"),
    Option("--trust-identity", "the signer's identity: the sigstore email/URI (with --trust-issuer), or a name "
           "its certificate must carry (with --trust-certificate)", group=VERIFY, metavar="ID"),
    Option("--trust-issuer", "the OIDC issuer of a sigstore signer (with --trust-identity)", group=VERIFY,
           metavar="URL"),
    Option("--signature-ignore", "files matching this glob may be synced without being signed (repeatable; "
           "env: comma-separated); the signature itself and git metadata always may", repeat=True, group=VERIFY),
    Option("--trust-root", "sigstore trust root (a ClientTrustConfig JSON) for air-gapped clusters",
           shown_default="sigstore's public one (network)", group=VERIFY, metavar="JSON"),
    Option("--concurrency", "parallel ranged downloads", _positive_int, default=DEFAULTS.concurrency,
           group=NETWORK, metavar="N"),
    Option("--offline", "make no network request: use what is already published", switch=True, group=NETWORK),
    Option("--s3-addressing-style", "S3 URL style for S3-compatible servers", default="auto",
           choices=get_args(AddressingStyle), group=NETWORK),
    Option("--stall-timeout", "retry, on a fresh connection from where it stopped, a request that receives "
           "nothing for this many seconds", _timeout, default=DEFAULTS.stall_timeout, group=NETWORK, metavar="SECONDS"),
    Option("--no-progress-timeout", "exit 7 once no byte has arrived and no request succeeded for this many "
           "seconds (a dead endpoint ends within this plus one --stall-timeout)", _timeout,
           default=DEFAULTS.no_progress_timeout, group=NETWORK, metavar="SECONDS"),
    Option("--retries", "attempts per network request before exit 7", _attempts,
           default=DEFAULTS.retries, group=NETWORK, metavar="N"),
    Option("--retry-base", "first retry delay in seconds (doubles each retry, full jitter)", _seconds,
           default=DEFAULTS.retry_base, group=NETWORK, metavar="SECONDS"),
    Option("--lock-timeout", "give up (exit 5) after waiting this long for another process's download",
           _seconds, shown_default="wait forever", group=LOCKING, metavar="SECONDS"),
    Option("--lock-mode", "auto = flock where it excludes other processes, else a lease file; lease = always "
           "the lease (set it on every pod of a FUSE/object-store volume)", default="auto",
           choices=get_args(LockMode), group=LOCKING),
    Option("--lease-timeout", "lease mode: take over a lease whose heartbeat stopped this many seconds ago",
           _timeout, default=DEFAULTS.lease_timeout, group=LOCKING, metavar="SECONDS"),
    Option("--log-format", "text lines, or one JSON object per event", default="text", choices=("text", "json"),
           group=OUTPUT),
    Option("--progress-interval", "seconds between progress lines when stderr is not a terminal", _seconds,
           default=DEFAULTS.progress_interval, group=OUTPUT, metavar="SECONDS"),
    Option("--termination-log", "where to write the Kubernetes termination message",
           shown_default="/dev/termination-log when it exists", group=OUTPUT, metavar="PATH"),
    Option("--metrics-textfile", "write Prometheus metrics here at the end (node_exporter textfile collector)",
           group=OUTPUT, metavar="PATH"),
    Option("--pushgateway", "push Prometheus metrics to this Pushgateway URL at the end, also on failure", _url,
           group=OUTPUT, metavar="URL"),
    Option("--debug", "log details and show tracebacks", switch=True, group=OUTPUT),
    Option("--skip-checks", "do not check safetensors shards and headers before exec", switch=True,
           group="the server"),
    Option("--require-gpu", "fail (exit 2) before syncing unless a CUDA device is visible", switch=True,
           group="the server"),
    Option("--metrics-port", "serve /metrics, /readyz and /healthz on this port", _port, group="serve mode",
           metavar="PORT"),
    Option("--ready-file", "create this file once the model is published (for probes)", group="serve mode",
           metavar="PATH"),
    Option("--recheck-interval", "seconds between checks for a new revision (0 = never)", _seconds,
           default=300.0, group="serve mode", metavar="SECONDS"),
    Option("--to", "the S3 or S3-compatible store to mirror into: s3://bucket/prefix (the bucket must exist)",
           required=True, group=WHAT, metavar="URI"),
    Option("--to-endpoint", "send the target's requests to this S3 endpoint instead of the environment's "
           "(AWS_ENDPOINT_URL): for an s3:// source on another endpoint than the in-cluster store", _url,
           shown_default="the AWS environment's", group=NETWORK, metavar="URL"),
    Option("--part-size", "mirror: multipart part size in MiB (memory: one part per file in flight)",
           _mebibytes, default=DEFAULTS.part_size, shown_default=f"{DEFAULTS.part_size >> 20}", group=NETWORK,
           metavar="MIB"),
    Option("--json", "print JSON instead of a table", switch=True, group=OUTPUT),
    Option("--keep", "keep the N newest revisions of each model (`current`, refs/ and locked ones are always "
           "kept)", _keep, required=True, group="what to remove", metavar="N"),
    Option("--dry-run", "say what would be removed and the space that would be freed; remove nothing",
           switch=True, group="what to remove"),
    Option("--staging-older-than", "remove abandoned staging untouched for this many seconds", _seconds,
           default=86400.0, group="what to remove", metavar="SECONDS"),
)}


def _options(*flags: str, **changed: dict[str, Any]) -> tuple[Option, ...]:
    """The named options, some with command-specific changes (`--name={"help": ...}`)."""
    options = tuple(ALL_OPTIONS[flag] for flag in flags)
    return tuple(replace(option, **changed[option.dest]) if option.dest in changed else option for option in options)


SOURCE_FLAGS = ("--source", "--name", "--revision", "--include", "--exclude", "--s3-addressing-style")
TRUST_FLAGS = ("--signature", "--trust-key", "--trust-certificate", "--trust-identity", "--trust-issuer",
               "--trust-root", "--signature-ignore")
SYNC_FLAGS = ("--source", "--fallback", "--dest", "--name", "--layout", "--repo-id", "--revision", "--include",
              "--exclude", "--lockfile", "--rebind",
              "--verify", "--require-checksum", *TRUST_FLAGS, "--concurrency", "--offline", "--s3-addressing-style",
              "--stall-timeout", "--no-progress-timeout", "--retries", "--retry-base", "--lock-timeout",
              "--lock-mode", "--lease-timeout",
              "--log-format", "--progress-interval", "--termination-log", "--metrics-textfile", "--pushgateway",
              "--debug")
RUN_DESCRIPTION = """\
sync, check the model, then exec COMMAND in place of weightsync (same PID, so signals reach the server).

The server starts with MODEL_DIR=<the published revision directory> in its environment, and the literal
{MODEL_DIR} in its arguments is replaced by that path, so no shell is needed:

  weightsync run --source s3://models/llama --dest /models -- vllm serve {MODEL_DIR}

The command is looked up before the sync (exit 127 if not found, 126 if not executable), so a typo costs
no download."""
MIRROR_DESCRIPTION = """\
fetch a model once into an S3 (or S3-compatible) store, every byte verified against the origin's own checksums
as it streams, then commit it with a lockfile object (PREFIX/weightsync.lock) written last:

  weightsync mirror --source hf://meta-llama/Llama-3.1-8B --to s3://models/meta-llama/Llama-3.1-8B

Pods then sync from the mirror (weightsync sync --source s3://models/meta-llama/Llama-3.1-8B) and get the
origin's revision id, each file checked against the lockfile's sha256. A killed mirror resumes its multipart
uploads; a rerun of the same revision uploads nothing; a new revision uploads only what changed and deletes
what it no longer has after its lockfile is written. The target uses the standard AWS environment
(AWS_ENDPOINT_URL for an in-cluster store; --to-endpoint when an s3:// origin lives on another endpoint).
The last stdout line is the target URI."""
COMMANDS: dict[str, tuple[str, str, tuple[Option, ...]]] = {
    "sync": ("sync and print the published model directory", "", _options(*SYNC_FLAGS)),
    "run": ("sync, check the model, then exec COMMAND with MODEL_DIR set", RUN_DESCRIPTION,
            _options(*SYNC_FLAGS, "--skip-checks", "--require-gpu")),
    "serve": ("native-sidecar mode: sync, report ready, serve metrics, pick up new revisions", "",
              _options(*SYNC_FLAGS, "--metrics-port", "--ready-file", "--recheck-interval", "--require-gpu")),
    "verify": ("re-hash a published model against its manifest", "",
               _options("--dest", *SOURCE_FLAGS, *TRUST_FLAGS, "--log-format", "--debug",
                        source={"help": "the source it was synced from",
                                "shown_default": "the one recorded on the volume"},
                        name={"help": "the model to verify", "shown_default": "the only model on DEST"},
                        revision={"help": "the revision to verify", "shown_default": "current"})),
    "lock": ("sync once and print a lockfile pinning the revision and every file's sha256", "",
             _options("--source", "--revision", "--include", "--exclude", "--lockfile", "--s3-addressing-style",
                      "--dest",
                      "--name", "--concurrency", "--stall-timeout", "--no-progress-timeout", "--require-checksum",
                      *TRUST_FLAGS,
                      "--log-format", "--debug",
                      dest={"required": False, "help": "keep the synced model on this volume",
                            "shown_default": "a temporary directory"},
                      lockfile={"help": "with an https:// base URL as --source: lock it to this lockfile's files "
                                "(made from a local copy), checked against the bytes the server sends"})),
    "mirror": ("fetch a model once into an S3 store that every pod then syncs from", MIRROR_DESCRIPTION,
               _options("--source", "--to", "--revision", "--include", "--exclude", "--to-endpoint", "--part-size",
                        "--concurrency", "--s3-addressing-style", "--stall-timeout", "--no-progress-timeout",
                        "--retries", "--retry-base", "--log-format", "--progress-interval", "--termination-log",
                        "--debug",
                        source={"required": True, "help": "the origin, any source weightsync syncs from: s3://, hf://, "
                                "gs://, az://, oci://, https:// (one file), file:///abs/path or a directory"},
                        revision={"help": "branch, tag or commit (hf), or a revision id of the source (pin)"},
                        concurrency={"help": "files mirrored at once (each holds one part in memory)"})),
    "status": ("the models, revisions, staging and lock holders on a volume", "",
               _options("--dest", "--json", "--log-format", "--debug")),
    "gc": ("remove old revisions nothing points at and abandoned staging (never `current` or a locked one)", "",
           _options("--dest", "--name", "--keep", "--staging-older-than", "--dry-run", "--lock-mode", "--lease-timeout",
                    "--log-format", "--debug",
                    name={"help": "only this model", "shown_default": "every model on DEST"})),
}
COMMAND_EPILOG = "Exit codes and the environment: `weightsync --help`."
EPILOG = """\
Every option is also an environment variable: --lock-timeout is WEIGHTSYNC_LOCK_TIMEOUT (a flag wins).
An unknown WEIGHTSYNC_* variable is refused, so a typo never silently does nothing.
--log-format and --debug may also come before COMMAND. `weightsync COMMAND --help` lists its options.

exit codes:
  0    success (run: the server's own exit code once it runs)
  1    unexpected error (rerun with --debug and report it)
  2    usage: a bad flag, variable or value
  3    the source (bucket, prefix, repo, revision, folder) is missing or access is denied
  4    integrity: a checksum or size mismatch, an unsafe listing, a source that no longer matches a pin
  5    lock timeout, or a lost lease
  6    not enough disk space
  7    network failure after every retry
  126  run: the command is not executable
  127  run: the command was not found
  130  interrupted (rerun to resume)"""


def _add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    groups: dict[str, Any] = {}
    for option in sorted(options, key=lambda o: not o.required):  # what must be given comes first
        title = "required (a flag or its variable)" if option.required else option.group
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        group = groups[title]
        # A global flag given before the command must not be reset by the command's own (absent) one.
        default = argparse.SUPPRESS if option.flag in GLOBAL_FLAGS else None
        if option.switch:
            group.add_argument(option.flag, action="store_const", const=True, default=default,
                               help=option.help_text())
        elif option.repeat:
            group.add_argument(option.flag, action="append", metavar=option.metavar or "GLOB", default=default,
                               help=option.help_text())
        else:
            metavar = "{" + ",".join(option.choices) + "}" if option.choices else option.metavar or option.dest.upper()
            group.add_argument(option.flag, help=option.help_text(), metavar=metavar, default=default,
                               choices=option.choices or None, action=_StoreOnce)


def _resolve(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """Flag, else env var, else default; converted and validated."""
    values: dict[str, Any] = {}
    for option in options:
        raw = getattr(args, option.dest, None)
        origin = option.flag
        if raw is None and _env_value(option.env) is not None:
            raw, origin = _env_value(option.env), option.env
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `command` of that one alone.

    A command's subparser is used only when that command is the one given, and building all seven costs more
    than the rest of a warm start's parsing: `parse` builds all of them only for the top-level --help (which
    lists them) and a missing or mistyped command (whose error does).
    """
    parser = _Parser(prog="weightsync", description="Sync model weights into a volume (verified, resumable, "
                     "locked, atomically published), then exec the inference server.", epilog=EPILOG,
                     usage="weightsync [--log-format {text,json}] [--debug] COMMAND [options]")
    parser.add_argument("--version", action="version", version=f"weightsync {__version__}")
    for flag in GLOBAL_FLAGS:
        option = ALL_OPTIONS[flag]
        if option.switch:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=option.help_text())
        else:
            parser.add_argument(flag, choices=option.choices, metavar="{" + ",".join(option.choices) + "}",
                                help=option.help_text())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, description, options) in COMMANDS.items():
        if command not in (None, name):
            continue
        usage = f"weightsync {name} [options]" + (" -- COMMAND [ARGS...]" if name == "run" else "")
        _add_options(subparsers.add_parser(name, help=help_text, description=description or help_text.capitalize(),
                                           usage=usage, prog=f"weightsync {name}", epilog=COMMAND_EPILOG), options)
    return parser


def _check_before_command(argv: list[str]) -> str | None:
    """Only --log-format and --debug may come before COMMAND: say so, instead of argparse's `invalid choice`.

    Returns the command given, unless the top-level parser answers first (-h, --version before it) or there is
    none; None then.
    """
    index = 0
    answered = False
    while index < len(argv) and argv[index].startswith("-"):
        arg = argv[index]
        if arg in ("-h", "--help", "--version"):
            answered = True
            index += 1
        elif arg == "--debug" or arg.startswith("--log-format="):
            index += 1
        elif arg == "--log-format":
            index += 2
        else:
            flag = arg.split("=", 1)[0]
            where = next((name for name, (_, _, options) in COMMANDS.items()
                          if any(o.flag == flag for o in options)), None)
            if where is None:
                return None  # not an option of any command: argparse's own message (with suggestions) follows
            command = next((token for token in argv if token in COMMANDS), where)
            raise UsageError(f"{flag} goes after the command: `weightsync {command} {flag} ...`; only "
                             "--log-format and --debug may come before it")
    given = argv[index] if index < len(argv) else None
    return given if given in COMMANDS and not answered else None


def _unrecognized(command: str, extras: list[str]) -> UsageError:
    """An unknown flag gets a suggestion; a stray word after `run` gets a hint about `--`."""
    import difflib

    flags = [o.flag for o in COMMANDS[command][2]]
    first_flag = next((arg for arg in extras if arg.startswith("-")), None)
    if first_flag is not None:
        name = first_flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        prefixed = [flag for flag in flags if flag.startswith(name) and len(name) > 2]
        if close or prefixed:
            hint = (f"did you mean {close[0]}?" if close else
                    f"flags are never abbreviated; did you mean {' or '.join(prefixed[:3])}?")
            return UsageError(f"unrecognized option {name} for `weightsync {command}`; {hint} "
                              f"(see `weightsync {command} --help`)")
    if command == "run":
        return UsageError(f"unexpected {' '.join(extras[:4])!r}: put the server command after `--`, as in "
                          "`weightsync run --source ... --dest ... -- python -m server`")
    what = "option" if first_flag else "argument"
    return UsageError(f"unrecognized {what} {(first_flag or extras[0])!r} for `weightsync {command}` "
                      f"(see `weightsync {command} --help`)")


def parse(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The command and its resolved option values."""
    parser = build_parser(_check_before_command(argv))
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise UsageError(f"a command is required: {', '.join(COMMANDS)}")
    if extras:
        raise _unrecognized(args.command, extras)
    return args.command, _resolve(args, COMMANDS[args.command][2])


def _early_value(argv: list[str], flag: str) -> str | None:
    """A flag's value before parsing, so even a parse error is logged in the chosen format."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


class Terminated(BaseException):
    """SIGTERM (the kubelet deleting or evicting the pod, `docker stop`), raised in the main thread so the
    sync stops the way Ctrl-C stops it: staging kept for resume, termination message and metrics written,
    one error line, exit 143 (128 + 15, what a shell reports). `serve` installs its own handler; `run`'s
    exec hands the signal to the server, whose handlers start from the default again."""

    exit_code = 128 + signal.SIGTERM

    def __str__(self) -> str:
        return "terminated by SIGTERM; rerun to resume where it stopped"


def _raise_terminated(*_: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    debug = "--debug" in argv or (_env_value(ENV_PREFIX + "DEBUG") or "").lower() in TRUE
    from weightsync.logs import setup_logging

    log_format = _early_value(argv, "--log-format") or _env_value(ENV_PREFIX + "LOG_FORMAT") or "text"
    setup_logging(debug, "json" if log_format == "json" else "text")
    try:
        _check_env()
        name, values = parse(argv)
        if command and name != "run":
            raise UsageError(f"{name} takes no command after `--`; use `weightsync run ... -- COMMAND` "
                             "to start a server")
        from weightsync import commands

        return commands.dispatch(name, commands.Options.of(name, values), command)
    except WeightsyncError as exc:
        return _fail(f"weightsync: error: {exc}", exc.exit_code, debug, log_format, exc.fields())
    except KeyboardInterrupt:
        return _fail("weightsync: error: interrupted; rerun to resume where it stopped", 130, False, log_format)
    except Terminated as exc:
        return _fail(f"weightsync: error: {exc}", exc.exit_code, False, log_format)
    except Exception as exc:
        return _fail(f"weightsync: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for a "
                     "traceback and report it)", 1, debug, log_format)


def _fail(line: str, code: int, debug: bool, log_format: str, fields: dict[str, object] | None = None) -> int:
    """The one error line (or, with --log-format json, one `error` event); a traceback only under --debug."""
    from weightsync.logs import event, redact

    if debug:
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
    if log_format == "json":
        event("error", "%s", line, level=logging.ERROR, exit_code=code, **(fields or {}))
    else:
        print(redact(line), file=sys.stderr, flush=True)
    return code
