"""Progress of long operations: one callback protocol, called by the code that does the work (pruning, repairs,
activation capture, fine-tuning, profiling, measurement, recipes) and rendered by the front end.

    progress("analyse")                                  # a stage starts (no count)
    progress("lsq: layer", 12, 55)                       # 12 of 55 done
    progress("capture: images", 256)                     # a count without a known total
    progress("train: step", 40, 300, loss=0.41, lr=1e-3, images_per_s=850.0, eta_s=12.5, epoch=1, epochs=3)

``info`` carries the stage's named figures (a loss, a learning rate, a rate, an accuracy); a front end shows what it
knows and ignores the rest. Fine-tuning reports ``train: step`` (every optimiser step: ``epoch``, ``epochs``,
``loss``, ``lr``, ``temperature``, ``images_per_s``, ``eta_s``) and ``train: epoch`` (every epoch: ``loss`` and the
loss parts, ``top1``/``teacher_top1`` when evaluated).

The CLI shows it with rich when stdout is a terminal and as plain log lines on stderr when it is not
(``pipeline/cli/_progress.py``); the Python API passes nothing and sees nothing. A callback must be cheap: it is called
per layer, per batch, per round, per step.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int | None = None, total: int | None = None, **info: Any) -> None: ...


def silent(stage: str, done: int | None = None, total: int | None = None, **info: Any) -> None:
    """The progress callback that shows nothing (the default)."""
