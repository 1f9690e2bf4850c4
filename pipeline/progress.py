"""Progress of long operations: one small callback protocol, called by the code that does the work and rendered by
the front end.

    progress("analyse")                  # a stage starts (no count)
    progress("lsq: layer", 12, 55)       # 12 of 55 done
    progress("capture: images", 256)     # a count without a known total

The pruning operation (analyse, scoring, planning, every repair layer by layer, surgery, verification), activation
capture, recipes (pass by pass) and ``carve bench`` (round by round) call it. The CLI shows it with rich when stdout
is a terminal and as plain log lines on stderr when it is not (``pipeline/cli/_progress.py``); the Python API passes
nothing and sees nothing. A callback must be cheap: it is called per layer, per batch, per round.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None: ...


def silent(stage: str, done: int | None = None, total: int | None = None) -> None:
    """The progress callback that shows nothing (the default)."""


def counted(progress: Progress | None, stage: str):
    """A ``(done, total)`` callback reporting as ``stage`` (what the repairs' level-by-level runner takes)."""
    report = progress or silent

    def update(done: int, total: int | None = None) -> None:
        report(stage, done, total)

    return update
