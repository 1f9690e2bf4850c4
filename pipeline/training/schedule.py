"""Schedules over the training: the learning rate (cosine, with an optional linear warm-up; Loshchilov and Hutter,
"SGDR", ICLR 2017) and the distillation temperature.

Variable temperature (SFP, Information Sciences 2024, art. 121418; papers.md section 5: "Distillation Fine-Tuning
with Variable Temperature Coefficient"): T moves from ``start`` to ``end`` over the training, linearly in its progress
(our reconstruction: the paper's exact schedule was not available), so the student first matches the teacher's soft
class structure, then its decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from carve.pipeline.errors import CarveError


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``: linear warm-up, then cosine to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass(frozen=True)
class Temperature:
    """A distillation temperature, constant or moving linearly from ``start`` to ``end`` over the training."""

    start: float = 4.0
    end: float | None = None

    @classmethod
    def parse(cls, text: str | float) -> Temperature:
        """``4`` or ``4:1`` (start:end)."""
        parts = str(text).split(":")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise CarveError(f"`temperature`: expected T or START:END, got {text!r}") from None
        if len(values) > 2 or any(not v > 0 for v in values):
            raise CarveError(f"`temperature`: temperatures are positive numbers, T or START:END; got {text!r}")
        return cls(values[0], values[1] if len(values) == 2 else None)

    def at(self, progress: float) -> float:
        """The temperature at ``progress`` in [0, 1] of the training."""
        if self.end is None:
            return self.start
        return self.start + (self.end - self.start) * min(max(progress, 0.0), 1.0)

    def __str__(self) -> str:
        return f"{self.start:g}" if self.end is None else f"{self.start:g}:{self.end:g}"
