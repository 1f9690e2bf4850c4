"""FPGM: filter pruning via geometric median (He, Liu, Wang, Hu, Yang; CVPR 2019).

A filter close to the geometric median of its layer is replaceable by the others: its score is the sum of its
Euclidean distances to every other filter of the layer, s_i = sum_j ||F_i - F_j||, and the lowest scores are pruned.
Scores are per layer (producer); a unit sums its producers' scores.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria, filter_scores, pairwise_distances


@criteria.register("fpgm")
class FPGM(Criterion):
    description = "sum of distances to the layer's other filters (geometric median, He et al. 2019)"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        return filter_scores(ctx, lambda w: pairwise_distances(w).sum(axis=1))
