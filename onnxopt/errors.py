"""One error family: every message is one line saying where, what, and what to do."""

from __future__ import annotations

__all__ = ["OnnxoptError", "BadInputError", "CheckFailedError"]


class OnnxoptError(Exception):
    """Base class. The CLI prints the message as one line and exits with `exit_code`."""

    exit_code = 3


class BadInputError(OnnxoptError):
    """The user's file, flag or data is unusable (exit 2)."""

    exit_code = 2


class CheckFailedError(OnnxoptError):
    """A check the user asked for did not hold: validation over tolerance (exit 1)."""

    exit_code = 1
