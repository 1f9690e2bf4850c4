"""Random importance: the baseline every criterion must beat. One uniform draw per unit (seeded)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria


@criteria.register("random")
class Random(Criterion):
    description = "uniform random score per channel unit (seeded baseline)"
    needs = frozenset()

    def unit_scores(self, ctx: ScoreContext) -> np.ndarray:
        return ctx.rng.random(ctx.analysis.n_units)
