"""The importance-criterion interface and its registry.

A criterion scores channel **elements** (see :mod:`pipeline.channels`); a unit's score is the sum of its elements'
scores, so a channel shared by several producers (a residual stream) aggregates all of them consistently. A criterion
declares what it needs (``weights``, ``activations``, ``labels``, ``gradients``) so the CLI can ask for calibration data
and ``carve plugins`` can list it. Lower score = less important = removed first.

Register a criterion with the decorator (built-ins live in ``plugins/criteria/``), or from another package through the
``carve.criteria`` entry-point group::

    @criteria.register("l1")
    class L1(Criterion): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .channels import ChannelAnalysis
from .errors import CarveError
from .registry import Registry

criteria: Registry[type[Criterion]] = Registry(
    "criterion", entry_point_group="carve.criteria", builtin_modules=["plugins.criteria"]
)


@dataclass
class ScoreContext:
    analysis: ChannelAnalysis
    seed: int = 0
    calib: Any = None  # calibration data, for criteria that need activations/labels/gradients
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self):
        return self.analysis.model

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class Criterion:
    """Base class: override :meth:`element_scores` (or :meth:`unit_scores` when scoring whole units)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}  # accepted options and their defaults

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise CarveError(f"criterion {self.name!r} has no option {sorted(unknown)[0]!r}; its options: {valid}")
        self.opts = {**self.options, **options}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError

    def unit_scores(self, ctx: ScoreContext) -> np.ndarray:
        return ctx.analysis.unit_scores(self.element_scores(ctx))


def filter_scores(ctx: ScoreContext, fn) -> np.ndarray:
    """Element scores from a function of each producer's 2-D filter matrix (one row per output channel)."""
    scores = np.full(ctx.analysis.n_elements, np.nan)
    for src in ctx.analysis.producers():
        scores[src.start : src.start + src.count] = fn(ctx.analysis.filters(src).astype(np.float64))
    return scores


def get(name: str, **options: Any) -> Criterion:
    return criteria.get(name)(**options)
