"""First-order Taylor importance (Molchanov, Mallya, Tyree, Frosio, Kautz, "Importance Estimation for Neural
Network Pruning", CVPR 2019).

Removing a filter changes the loss by about the first-order term of its weights: I_o = (sum_{w in filter o} g_w w)^2,
computed per mini-batch of labelled calibration data and averaged over the batches, as in the paper (the bias is part
of the filter). Gradients come from running the ONNX graph in PyTorch (:mod:`carve.pipeline.data.gradients`).
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.gradients import weight_gradients
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria
from carve.pipeline.pruning.scoring import filter_rows


def bias_of(model, source):
    node = model.nodes[source.name]
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
        b = node.input[2]
        if model.is_const(b) and model.array(b).size == source.count:
            return b
    return None


@criteria.register("taylor")
class Taylor(Criterion):
    description = "(sum of gradient x weight over a filter)^2 (Molchanov et al. 2019)"
    needs = frozenset({"weights", "gradients", "labels"})

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, model = ctx.analysis, ctx.model
        sources = list(an.producers())
        names = sorted({s.weight for s in sources} | {b for s in sources if (b := bias_of(model, s))})
        acc = {s.name: np.zeros(s.count) for s in sources}
        batches = [0]

        def per_batch(grads: dict[str, np.ndarray]) -> None:
            batches[0] += 1
            for s in sources:
                if s.weight not in grads:
                    continue
                gw = filter_rows(grads[s.weight] * model.array(s.weight), s.axis).sum(1).astype(np.float64)
                b = bias_of(model, s)
                if b is not None and b in grads:
                    gw = gw + grads[b] * model.array(b)
                acc[s.name] += gw**2

        weight_gradients(model, ctx.calib, names=names, per_batch=per_batch)
        scores = np.full(an.n_elements, np.nan)
        for s in sources:
            scores[s.start : s.start + s.count] = acc[s.name] / max(batches[0], 1)
        return scores
