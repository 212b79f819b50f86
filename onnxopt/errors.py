"""One error family: every message is one line saying where, what, and what to do."""

from __future__ import annotations

__all__ = ["OnnxoptError", "BadInputError", "CannotGenerateError", "CheckFailedError", "first_line",
           "root_cause"]


class OnnxoptError(Exception):
    """Base class. The CLI prints the message as one line and exits with `exit_code`."""

    exit_code = 3


class BadInputError(OnnxoptError):
    """The user's file, flag or data is unusable (exit 2)."""

    exit_code = 2


class CannotGenerateError(BadInputError):
    """No input of this kind can be generated (a sequence, a map): where inputs only serve a
    check, the run goes on unverified and says so; where they are needed, exit 2."""


class CheckFailedError(OnnxoptError):
    """A check the user asked for did not hold: validation over tolerance (exit 1)."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    """An exception's message as one line (ORT's "[ONNXRuntimeError] : 1 : FAIL : " dropped)."""
    text = str(error).strip()
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text.splitlines()[0] if text else type(error).__name__


def root_cause(error: BaseException) -> str:
    """`Type: message` of the innermost exception of a `raise ... from` chain (onnx-ir wraps
    pass and serialization errors)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {first_line(error)}"
