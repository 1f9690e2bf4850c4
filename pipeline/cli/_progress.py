"""Showing progress (:mod:`carve.pipeline.progress`) on the command line: a rich progress display when stdout is a
terminal, plain log lines on stderr when it is not (CI logs, pipes), nothing with ``--quiet`` / ``--json``.

Log lines are ``carve prune: lsq: layer 12/55``, with the stage's figures when it has some (``carve run: train: step
40/300 (loss 0.41, lr 0.001)``): one when a stage starts, then at most one every :data:`LOG_EVERY_S` seconds per stage,
and one when a stage with a total finishes."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from carve.pipeline.progress import Progress, silent

LOG_EVERY_S = 2.0


def describe(stage: str, done: int | None = None, total: int | None = None, **info: Any) -> str:
    """One progress report as text: ``lsq: layer 12/55``, ``train: step 40/300 (loss 0.41, lr 0.001)``."""
    count = "" if done is None else f" {done}/{total}" if total is not None else f" {done}"
    figures = ", ".join(f"{k} {_figure(v)}" for k, v in info.items() if v is not None)
    return f"{stage}{count}" + (f" ({figures})" if figures else "")


def _figure(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class LogLines:
    """Progress as throttled log lines on ``stream``."""

    def __init__(self, prog: str, stream=None, every: float = LOG_EVERY_S) -> None:
        self.prog, self.stream, self.every = prog, stream or sys.stderr, every
        self.stage: str | None = None
        self.last = 0.0

    def __call__(self, stage: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
        now = time.monotonic()
        finished = total is not None and done is not None and done >= total
        if stage == self.stage and not finished and now - self.last < self.every:
            return
        self.stage, self.last = stage, now
        print(f"{self.prog}: {describe(stage, done, total, **info)}", file=self.stream, flush=True)


class RichProgress:
    """Progress as a rich display: one line per stage with its bar (or a spinner without a total)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        text = describe(stage, **info)  # the bar shows the count
        self.bar.update(self.tasks[stage], completed=done or 0, total=total, description=text)


@contextlib.contextmanager
def show_progress(prog: str, console, *, quiet: bool = False) -> Iterator[Progress]:
    """The progress callback for a command: rich on a terminal, log lines on stderr otherwise, silent when quiet."""
    if quiet:
        yield silent
        return
    if not sys.stdout.isatty():
        yield LogLines(prog)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        yield RichProgress(bar)
