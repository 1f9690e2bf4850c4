"""User errors versus bugs.

A :class:`CarveError` is a problem with the user's input (a file, a model, an option): its message names the file,
node or value at fault and says what to do. The CLI prints it (one line, and a hint line where there is something to
do) and exits 1 without a traceback. Any other exception is a bug in carve and is reported as such (exit 3).
A :class:`CarveWarning` (:func:`warn`) says something the user should know without stopping the run.
"""

from __future__ import annotations

import warnings


class CarveError(Exception):
    """A user-facing error: bad input, unsupported model, impossible request."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class UnsupportedModelError(CarveError):
    """The model uses something carve cannot analyse safely (e.g. control flow on the channel path)."""


class UnreachableTarget(CarveError):
    """A MAC or parameter target the plan cannot reach under its constraints (frozen channels, alignment, minimums)."""


class MissingDependencyError(CarveError):
    """An optional dependency (torchvision, TensorRT, a GPU) is not available."""


class CarveWarning(UserWarning):
    """Something the user should know that does not stop the run (data resized to fit the model, nothing removed).
    The CLI prints it as one line, ``carve <command>: warning: ...``, on stderr."""


def warn(message: str) -> None:
    """Tell the user (one line on stderr from the CLI; a :class:`CarveWarning` for API callers)."""
    warnings.warn(message, CarveWarning, stacklevel=2)


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (for one-line user errors that quote a library's complaint)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
