"""Replace this process with the inference server, pointed at the published model.

os.execvpe keeps the PID, so the server receives signals (SIGTERM from the kubelet
or `docker stop`) directly and weightsync costs nothing once the server runs.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from weightsync.errors import UsageError, WeightsyncError
from weightsync.progress import event

PLACEHOLDER = "{MODEL_DIR}"


def server_command(command: list[str], model_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The argv (with {MODEL_DIR} substituted) and environment the server starts with."""
    if not command:
        raise UsageError("run needs the server command after `--`, e.g. "
                         "`weightsync run --source ... --dest ... -- python -m server`")
    argv = [arg.replace(PLACEHOLDER, str(model_dir)) for arg in command]
    env = dict(os.environ)
    env["MODEL_DIR"] = str(model_dir)
    return argv, env


def exec_server(command: list[str], model_dir: Path) -> None:
    """Exec the server; only returns by raising when the command cannot be started."""
    argv, env = server_command(command, model_dir)
    event("exec", "exec %s (MODEL_DIR=%s)", shlex.join(argv), model_dir, argv=argv, model_dir=str(model_dir))
    for handler in logging.getLogger("weightsync").handlers:
        handler.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot run {argv[0]!r}: command not found; check the command after `--`") from exc
    except PermissionError as exc:
        raise UsageError(f"cannot run {argv[0]!r}: permission denied") from exc
    except OSError as exc:
        raise WeightsyncError(f"cannot run {argv[0]!r}: {exc.strerror}") from exc
