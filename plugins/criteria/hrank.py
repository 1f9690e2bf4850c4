"""HRank: filter pruning using high-rank feature maps (Lin et al., CVPR 2020).

A channel whose feature maps have low matrix rank carries little information: score_i = E_x[rank(O_i(x))], the mean
rank of the H x W post-activation map of channel i over calibration images (the paper uses a few batches; carve uses
``--samples``). Accumulated batch by batch; memory holds one running sum per channel.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.activations import activation_tensor, spatial_producers
from carve.pipeline.data.capture import capture
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria


class _RankSum:
    def __init__(self) -> None:
        self.sum: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def update(self, name: str, value: np.ndarray, labels) -> None:
        import torch

        ranks = torch.linalg.matrix_rank(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))).numpy()
        self.sum[name] = self.sum.get(name, 0) + ranks.sum(axis=0)
        self.count[name] = self.count.get(name, 0) + len(value)


@criteria.register("hrank")
class HRank(Criterion):
    description = "mean matrix rank of each channel's feature maps (Lin et al. 2020)"
    needs = frozenset({"activations"})
    tensor_kind = "post-activation"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an = ctx.analysis
        sources = spatial_producers(an)
        tensors = {s.name: activation_tensor(an, s) for s in sources}
        acc = _RankSum()
        capture(ctx.model, sorted(set(tensors.values())), ctx.calib, acc, progress=ctx.progress)
        scores = np.full(an.n_elements, np.nan)
        for s in sources:
            t = tensors[s.name]
            scores[s.start : s.start + s.count] = acc.sum[t] / acc.count[t]
        return scores
