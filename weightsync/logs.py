"""Log lines on stderr, and everything else that leaves the process as text, with secrets redacted.

`--log-format json` turns every line into one JSON object with an `event` field
(start, plan, progress, file_verified, retry, published, exec, error, ...). Every
line, and the Kubernetes termination message, passes through `redact`, so
credentials, access tokens and presigned-URL signatures never reach a log. The progress display
(progress.py) and the retry loop (retry.py) log through `event` here, and every
report formats counts, sizes and durations with the helpers here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import TextIO

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
              "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET", "IDENTITY_HEADER", "WEIGHTSYNC_HTTP_TOKEN")
# Presigned-URL signatures (S3's X-Amz-*, GCS's X-Goog-*, CloudFront's), an Azure SAS's `sig`, and a connection
# string's secrets.
SIGNED_QUERY = re.compile(r"(?i)((?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                          r"x-goog-credential|signature|key-pair-id|policy|token|(?<![\w-])sig|accountkey|"
                          r"sharedaccesssignature)=)[^&;\s\"']+")
HF_TOKEN_SHAPE = re.compile(r"\bhf_[A-Za-z0-9]{10,}\b")
GOOGLE_TOKEN_SHAPE = re.compile(r"\bya29\.[A-Za-z0-9_.-]+")
"""A Google OAuth 2.0 access token (what ADC and the metadata server hand out for gs://)."""


def redact(text: str) -> str:
    """Remove secret values known from the environment and signature-like URL parameters."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = SIGNED_QUERY.sub(r"\1***", text)
    text = GOOGLE_TOKEN_SHAPE.sub("ya29.***", text)
    return HF_TOKEN_SHAPE.sub("hf_***", text)


log = logging.getLogger("weightsync")


def event(kind: str, message: str, /, *args: object, level: int = logging.INFO, **fields: object) -> None:
    """Log one event: a plain line in text format, an object with these fields in JSON format."""
    log.log(level, message, *args, extra={"event": kind, "fields": fields})


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        body.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            body["traceback"] = self.formatException(record.exc_info)
        return redact(json.dumps(body, default=str, ensure_ascii=False))


class _PerFileInText(logging.Filter):
    """In text format a line per verified file is noise unless --debug; JSON keeps every event."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        return self.debug or getattr(record, "event", None) != "file_verified"


def setup_logging(debug: bool, log_format: str = "text", stream: TextIO | None = None) -> None:
    """Log to stderr as `weightsync: message` (timestamps and levels under --debug) or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        fmt = "%(asctime)s weightsync %(levelname)s %(threadName)s: %(message)s" if debug else "weightsync: %(message)s"
        handler.setFormatter(_TextFormatter(fmt))
        handler.addFilter(_PerFileInText(debug))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 file`, `3 files`, `1 index`, `2 indexes`: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def named(paths: list[str], shown: int = 1) -> str:
    """`a.bin`, or `a.bin, b.bin (and 3 more files)`: the first `shown` files named in an error line, the rest
    counted."""
    rest = len(paths) - shown
    return ", ".join(paths[:shown]) + (f" (and {counted(rest, 'more file', 'more files')})" if rest > 0 else "")


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LIMIT = 4096  # the kubelet keeps at most 4096 bytes of a termination message


def write_termination_message(path: str | None, body: dict[str, object]) -> None:
    """Tell `kubectl describe pod` how the init container ended (only where the file exists, unless asked)."""
    target = path or TERMINATION_LOG
    if path is None and not os.path.exists(target):
        return
    text = redact(json.dumps(body, default=str, ensure_ascii=False))[:TERMINATION_LIMIT]
    try:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        log.debug("could not write the termination message to %s: %s", target, exc.strerror)
