"""The mistakes a user can make, as exceptions: each message is one line naming the file, field or value.

The command line prints them without a traceback: ConfigError exits with 2, the others with 1.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A user's configuration mistake: printed as one line, exit code 2."""


class DataError(ValueError):
    """A user's data is unusable: the message names the file and the problem."""


class DecodeError(DataError):
    """A file is not a readable image. `reason` says why, without the file name."""

    def __init__(self, source: str, reason: str | None = None):
        # One-argument form: what pickling and DataLoader's re-raise of a worker's error call.
        super().__init__(source if reason is None else f"{source}: {reason}")
        self.source, self.reason = source, reason if reason is not None else source


class DataChoiceError(ConfigError, DataError):
    """Data the options cannot be used with (a built-in set with --data.channels, an ImageFolder of one class):
    the user's to fix by another option or other data, so a usage error (exit code 2), and a DataError to the
    code that handles those."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): fits in a one-line error."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
