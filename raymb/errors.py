"""Errors a user can cause. Each carries a one-line message that names what to fix."""


class RaymbError(Exception):
    """Base class: the CLI prints the message on one line and exits non-zero."""


class ConfigError(RaymbError):
    """A config key is unknown, of the wrong type, or has an impossible value."""


class DataError(RaymbError):
    """The training or validation data cannot be used as configured."""


class CheckpointError(RaymbError):
    """A checkpoint is missing, truncated, or belongs to another model or config."""


class StorageError(RaymbError):
    """A run directory or dataset location cannot be reached, read or written (a missing
    bucket, refused credentials, no endpoint). `reason` is the message without the location."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An error's message on one line (its whitespace runs made one space), cut at `limit`
    characters; its type's name when it has no message: what a refusal quotes of a library's
    error."""
    text = " ".join(str(error).split())
    return (text if limit is None else text[:limit]) or type(error).__name__
