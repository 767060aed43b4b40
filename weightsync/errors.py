"""Every failure the user can act on, each with the exit code the README documents.

The CLI turns a WeightsyncError into exactly one `weightsync: error: ...` line and
its exit code, so messages here must say what failed, where, and what to do. An
error may also carry structured fields (`path`, `expected`, `got`): they travel in
the JSON `error` event and the Kubernetes termination message, so a log pipeline or
an operator can act on them without parsing the sentence.
"""

from __future__ import annotations


class WeightsyncError(Exception):
    """Base class: exit code 1, 'anything else'."""

    exit_code = 1

    def __init__(self, message: str = "", *, path: str | None = None, expected: object = None,
                 got: object = None) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.got = got

    def fields(self) -> dict[str, object]:
        """The structured fields that are set, for JSON events and the termination message."""
        return {name: value for name, value in (("path", self.path), ("expected", self.expected),
                                                ("got", self.got)) if value is not None}


class UsageError(WeightsyncError):
    """A flag, env var or config value is wrong."""

    exit_code = 2


class SourceError(WeightsyncError):
    """The source (bucket, key, repo, revision, folder) is missing or access is denied."""

    exit_code = 3


class IntegrityError(WeightsyncError):
    """Bytes did not match what the source promised (checksum or size), or a listing was unsafe."""

    exit_code = 4


class LockTimeoutError(WeightsyncError):
    """Another process held the volume lock for longer than --lock-timeout."""

    exit_code = 5


class LockLostError(WeightsyncError):
    """Another process took over this process's lease (it was frozen for longer than --lease-timeout)."""

    exit_code = 5


class DiskSpaceError(WeightsyncError):
    """The volume has too little free space for what must be downloaded."""

    exit_code = 6


class NetworkError(WeightsyncError):
    """The network kept failing after every retry."""

    exit_code = 7


class CommandNotExecutableError(WeightsyncError):
    """`run`: the server command exists but cannot be executed (as shells and tini report it)."""

    exit_code = 126


class CommandNotFoundError(WeightsyncError):
    """`run`: the server command is not on PATH or not at the path given."""

    exit_code = 127


class TransientError(Exception):
    """A failure worth retrying (connection reset, short read, 5xx, throttling).

    Sources raise it; the retry loop turns the last one into a NetworkError.
    `retry_after` carries a server's Retry-After hint in seconds, if it sent one.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
