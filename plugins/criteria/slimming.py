"""Network slimming: the BatchNorm scale as channel importance (Liu et al., "Learning Efficient Convolutional Networks
through Network Slimming", ICCV 2017).

Post-training, the score of a channel is |gamma| of the BatchNormalization that normalises it (``normalized=True``:
|gamma| / sqrt(var + eps), the factor the channel is actually multiplied by). A unit sums the scales of every BN its
channels pass through. Models whose BN was folded into the convolutions (the default of most exporters) have no BN
left: this criterion then refuses with a clear error.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.bn import bn_scale_shift
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria


@criteria.register("slimming")
class Slimming(Criterion):
    description = "|gamma| of the BatchNorm after each channel (Liu et al. 2017); needs unfused BN"
    options = {"normalized": False}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, model = ctx.analysis, ctx.model
        acc = np.zeros(an.n_elements)
        touched = np.zeros(an.n_elements, dtype=bool)
        found = False
        for node in model.graph.node:
            if node.op_type != "BatchNormalization":
                continue
            chan = an.tensors.get(node.input[0])
            if chan is None or not all(model.is_const(i) for i in node.input[1:5]):
                continue
            found = True
            if self.opts["normalized"]:
                s = np.abs(bn_scale_shift(model, node)[0])
            else:
                s = np.abs(model.array(node.input[1]).astype(np.float64))
            np.add.at(acc, chan.ids, s)  # ids may repeat (depthwise multiplier): accumulate
            touched[chan.ids] = True
        if not found:
            raise CarveError(
                "criterion 'slimming' needs BatchNormalization nodes, and this model has none: its BN was folded "
                "into the convolutions",
                hint="export with BN kept (`carve export` keeps it; `carve export --fold-bn` folds it), or use "
                "l1/fpgm/apbm",
            )
        return np.where(touched, acc, np.nan)
