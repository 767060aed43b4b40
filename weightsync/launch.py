"""Replace this process with the inference server, pointed at the published model.

os.execvpe keeps the PID, so the server receives signals (SIGTERM from the kubelet
or `docker stop`) directly and weightsync costs nothing once the server runs.
The command is looked up before the sync (`check_command`), so a typo fails in
a second instead of after a cold download; exec failures keep the shell's codes
(127 not found, 126 not executable).
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
from collections.abc import Iterable
from pathlib import Path

from weightsync.errors import CommandNotExecutableError, CommandNotFoundError, UsageError, WeightsyncError
from weightsync.logs import event

PLACEHOLDER = "{MODEL_DIR}"
MISSING_COMMAND = ("run needs the server command after `--`, e.g. "
                   "`weightsync run --source ... --dest ... -- python -m server`")


def check_command(command: list[str]) -> None:
    """Refuse a server command that cannot start, before anything is downloaded.

    A program that names {MODEL_DIR} (a script shipped with the model) can only be checked after the sync.
    """
    if not command:
        raise UsageError(MISSING_COMMAND)
    program = command[0]
    if PLACEHOLDER in program:
        return
    candidates: Iterable[Path]
    if "/" in program:
        candidates = [Path(program)]
    else:
        candidates = (Path(directory or ".", program) for directory in os.environ.get("PATH", os.defpath).split(":"))
    found = None  # the first file of that name, when none is executable
    for path in candidates:
        if path.is_file():
            if os.access(path, os.X_OK):
                return
            found = found or path
    if found:
        raise CommandNotExecutableError(f"cannot run {program!r}: {found} is not executable; chmod +x it, or "
                                        "start it through its interpreter (`-- python script.py`)")
    if "/" in program:
        raise CommandNotFoundError(f"cannot run {program!r}: no such file; check the command after `--`")
    raise CommandNotFoundError(f"cannot run {program!r}: command not found on PATH; check the command after `--`"
                               " (or give its full path)")


def server_command(command: list[str], model_dir: Path, hub_cache: Path | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """The argv (with {MODEL_DIR} substituted) and environment the server starts with.

    With the hub cache layout the server finds the model by repo id: HF_HUB_CACHE points at the cache, and
    HF_HUB_OFFLINE=1 (unless the environment says otherwise) keeps huggingface_hub from asking the Hub again
    for what was just verified, and from waiting on a Hub it cannot reach.
    """
    if not command:
        raise UsageError(MISSING_COMMAND)
    argv = [arg.replace(PLACEHOLDER, str(model_dir)) for arg in command]
    env = dict(os.environ)
    env["MODEL_DIR"] = str(model_dir)
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
        env.setdefault("HF_HUB_OFFLINE", "1")
    return argv, env


def exec_server(command: list[str], model_dir: Path, hub_cache: Path | None = None) -> None:
    """Exec the server; only returns by raising when the command cannot be started."""
    argv, env = server_command(command, model_dir, hub_cache)
    event("exec", "exec %s (MODEL_DIR=%s)", shlex.join(argv), model_dir, argv=argv, model_dir=str(model_dir))
    for handler in logging.getLogger("weightsync").handlers:
        handler.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError as exc:
        raise CommandNotFoundError(f"cannot run {argv[0]!r}: command not found; check the command after `--`"
                                   ) from exc
    except PermissionError as exc:
        raise CommandNotExecutableError(f"cannot run {argv[0]!r}: it is not executable (permission denied); "
                                        "chmod +x it, or start it through its interpreter") from exc
    except OSError as exc:
        if exc.errno == errno.ENOEXEC:
            raise CommandNotExecutableError(f"cannot run {argv[0]!r}: not an executable format (a script "
                                            "without a #! line?)") from exc
        raise WeightsyncError(f"cannot run {argv[0]!r}: {exc.strerror}") from exc
