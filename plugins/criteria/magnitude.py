"""Magnitude criteria: the L1 norm of a filter (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017) and
its L2 variant. A unit scores the sum of the norms of its filters (every producer and depthwise filter it contains);
in a transformer's groups (a residual stream under LayerNorm, attention heads) also of the consumer columns it feeds,
scaled by the LayerNorm scale they are read through: the whole group's weights
(:func:`carve.pipeline.pruning.criterion.consumer_scores`)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.criterion import Criterion, ScoreContext, consumer_scores, criteria, filter_scores


@criteria.register("l1")
class L1(Criterion):
    description = "sum of |w| of each filter (Li et al. 2017)"
    reads_filter_scale = True

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        fn = lambda w: np.abs(w).sum(axis=1)  # noqa: E731
        return np.nan_to_num(filter_scores(ctx, fn)) + consumer_scores(ctx, fn)


@criteria.register("l2")
class L2(Criterion):
    description = "Euclidean norm of each filter"
    reads_filter_scale = True

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        fn = lambda w: np.sqrt((w * w).sum(axis=1))  # noqa: E731
        return np.nan_to_num(filter_scores(ctx, fn)) + consumer_scores(ctx, fn)
