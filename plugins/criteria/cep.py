"""CEP: cross-entropy pruning (Neural Computation 30(11):3128-3149, 2018, doi 10.1162/neco_a_01131).

From the paper: connections are grouped by output neuron; within a group, connections whose cross-entropy error is
below a per-group threshold are removed; HCEP always keeps a small portion with the highest CEP.
Reconstruction (papers.md section 1): the cross-entropy error of a weight is the first-order Taylor term
s_w = |g_w w| with g the loss gradient averaged over a labelled batch (``variant="taylor"``), or the Fisher/OBD term
s_w = 0.5 w^2 E[g^2] (``variant="fisher"``). A group is a filter (conv) or a row (fully connected).
Ours: with many calibration batches, s_w = E_batches[|g_w w|] -- the gradient of a converged model averaged over the
whole set is close to zero, so averaging |g w| per mini-batch is what keeps the first-order term informative
(docs/criteria.md).

* Structured (this criterion, for ``carve prune``): a channel scores S_o = sum_{w in group o} s_w; with ``hcep`` > 0 the
  top ``hcep`` fraction of channels of every layer score +inf and are never pruned (HCEP's keep-the-highest rule).
* Gradient-free (``variant="delta"``, papers.md's exact variant): S_u = CE(model without unit u) - CE(model) on the
  calibration data, measured unit by unit (the unit's consumer columns zeroed, which is exactly what pruning it does;
  PyTorch runner, ``samples`` images). One forward pass over the sample per prunable unit: exact, and slow on big
  models. HCEP applies per unit of every layer's producers as above.
* Unstructured (``carve sparsify --criterion cep``, :func:`carve.pipeline.pruning.scoring.weight_mask`): within
  each group, weights with s_w < lambda * mean(s over the group) are zeroed, except the group's top ``hcep`` fraction;
  lambda is found by bisection for a target sparsity. Zeroed weights give no dense-kernel speed-up: carve reports
  sparsity, not latency.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from carve.pipeline.data.batching import model_batches
from carve.pipeline.data.gradients import check_labels, weight_gradients
from carve.pipeline.errors import CarveError
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria
from carve.pipeline.pruning.scoring import filter_rows, weight_scores


def delta_loss(ctx: ScoreContext, samples: int | None) -> np.ndarray:
    """Per unit: the cross-entropy increase on the calibration sample when the unit is removed (0 for frozen units)."""
    import torch
    import torch.nn.functional as F

    from carve.pipeline.runtime.torch_graph import TorchGraph

    an = ctx.analysis
    data = ctx.calib.sample(samples, seed=ctx.seed) if samples else ctx.calib
    tg = TorchGraph(ctx.model).eval()
    if data.labels is None:
        raise CarveError(f"cep variant delta needs labelled calibration data; {data.name} has no labels")
    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y, _ in model_batches(ctx.model, data, 64)]
    counted = sum(len(x) for x, _ in batches)

    def loss() -> float:
        total = 0.0
        with torch.no_grad():
            for x, y in batches:
                out = tg(x)
                logits = out[0] if isinstance(out, tuple) else out
                check_labels(data, y.numpy(), logits.reshape(len(x), -1).shape[1])
                total += float(F.cross_entropy(logits.reshape(len(x), -1), y, reduction="sum"))
        return total / counted

    # where each unit is read: (parameter, axis, positions) of every consumer's input columns
    reads: dict[int, list] = defaultdict(list)
    for rec in an.slice_records:
        if rec.role == "in" and rec.tensor in tg.param_of:
            units = an.unit_of[rec.ids]
            for u in np.unique(units[~an.unit_frozen[units]]):
                reads[int(u)].append((tg.parameter(rec.tensor), rec.axis, torch.from_numpy(np.flatnonzero(units == u))))
    base = loss()
    scores = np.zeros(an.n_units)
    with torch.no_grad():
        for u, places in reads.items():
            saved = [(p, axis, idx, p.index_select(axis, idx).clone()) for p, axis, idx in places]
            for p, axis, idx in places:
                p.index_fill_(axis, idx, 0.0)
            scores[u] = loss() - base
            for p, axis, idx, old in saved:
                p.index_copy_(axis, idx, old)
    ctx.extra["cep_loss"] = base
    return scores


@criteria.register("cep")
class CEP(Criterion):
    description = "cross-entropy error of each filter's weights, grouped thresholds + HCEP (Neural Comput. 2018)"
    needs = frozenset({"weights", "gradients", "labels"})  # delta: labelled data and forward passes, no gradients
    options = {"variant": "taylor", "hcep": 0.0, "samples": 256}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, model = ctx.analysis, ctx.model
        if self.opts["variant"] == "delta":
            # each element carries an equal share of its unit's measured loss increase (units sum them back)
            units = delta_loss(ctx, self.opts["samples"])
            if self.opts["hcep"] > 0:
                for src in an.producers():
                    mine = np.unique(an.unit_of[src.start : src.start + src.count])
                    keep = max(1, int(np.ceil(self.opts["hcep"] * len(mine))))
                    units[mine[np.argsort(-units[mine])[:keep]]] = np.inf
            share = np.bincount(an.unit_of, minlength=an.n_units)
            return units[an.unit_of] / share[an.unit_of]
        sources = list(an.producers())
        grads = weight_gradients(model, ctx.calib, names=sorted({s.weight for s in sources}))
        scores = np.full(an.n_elements, np.nan)
        hcep = float(self.opts["hcep"])
        for s in sources:
            if s.weight not in grads.mean:
                continue
            sw = weight_scores(grads, s.weight, model.array(s.weight), self.opts["variant"])
            group = filter_rows(sw, s.axis).sum(1)
            if hcep > 0:
                keep = max(1, int(np.ceil(hcep * len(group))))
                group[np.argsort(-group)[:keep]] = np.inf
            scores[s.start : s.start + s.count] = group
        ctx.extra["cep_loss"] = grads.loss
        return scores
