"""Magnitude criteria: the L1 norm of a filter (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) and
its L2 variant. A unit scores the sum of the norms of its filters (every producer and depthwise filter it contains)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria, filter_scores


@criteria.register("l1")
class L1(Criterion):
    description = "sum of |w| of each filter (Li et al. 2017)"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        return filter_scores(ctx, lambda w: np.abs(w).sum(axis=1))


@criteria.register("l2")
class L2(Criterion):
    description = "Euclidean norm of each filter"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        return filter_scores(ctx, lambda w: np.sqrt((w * w).sum(axis=1)))
