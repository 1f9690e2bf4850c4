"""Helpers shared by the command modules: argument types, the command line recorded in metadata, console output."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import CarveError


def command_line() -> str:
    """The command as the user typed it (recorded in the metadata of every model carve writes)."""
    return " ".join(["carve", *map(shlex.quote, sys.argv[1:])])


def fraction(text: str) -> float:
    """A fraction in [0, 1): ``0.3`` or ``30%``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text!r}")
    return value


def fraction_keep(text: str) -> float:
    """A fraction in (0, 1] of the original to keep: ``0.5`` or ``50%``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """``1,8,32`` -> [1, 8, 32]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def console(quiet: bool = False):
    """A rich console on stdout; quiet prints nothing. Piped output gets a wide page so tables stay one row a line."""
    import os

    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(quiet=quiet, highlight=False, soft_wrap=False, width=width)


def require(condition: bool, message: str, hint: str | None = None) -> None:
    if not condition:
        raise CarveError(message, hint=hint)
