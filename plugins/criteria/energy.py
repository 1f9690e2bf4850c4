"""Output energy: how much of the next layers' input a channel carries, measured on calibration data.

Removing channel c of a tensor x that a layer reads with weights W changes that layer's output by W[:, c] x_c; the
criterion scores c by the expected energy of that change, ``E[x_c^2] * ||W_eff[:, c]||^2``, summed over every weighted
layer (Conv, Gemm, MatMul) that reads the channel. ``W_eff`` is the consumer's weight with the BatchNormalization that
follows it folded in (its output rows times the BN's scale). It is the structured, squared form of Wanda's per-weight
score |W_ij| * ||X_j|| (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024), summed over a channel's column as channel-pruning methods that reconstruct the next layer's output (He,
Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017) measure a channel.

Why it exists (issue 26): a plain eval-mode ``torch.onnx.export`` folds every BN into its conv, multiplying each filter
by gamma / sigma. L1 then ranks filters by a product of BN's scale and the raw filter, and picks other channels than on
the same network exported with BN kept, which recover worse (measured: docs/finetune.md, "Pruning folded exports").
This score depends only on what the network computes — the tensors the next layers read and the effective weights they
read them with — so it is the same on both exports (folding a BN changes neither), and unchanged by the rescaling a
ReLU network allows (a channel times s > 0, its consumers' columns times 1 / s). Channels with no weighted consumer (a
group read only by ops without weights) are scored by the energy of their producers' effective filters instead.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.capture import ChannelMoments, capture
from carve.pipeline.graph.bn import bn_scale_shift, folded_filters, following_bn
from carve.pipeline.graph.model import attr
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria


def _reading(model, rec):
    """(activation tensor, its channel axis) of a consumer record, or None where the columns cannot be matched to one
    activation's channels."""
    node = model.nodes[rec.node]
    if not model.is_const(rec.tensor):
        return None
    if node.op_type == "Conv" and node.input[1] == rec.tensor and rec.axis == 1 and int(attr(node, "group", 1)) == 1:
        return node.input[0], 1
    if node.op_type == "Gemm" and node.input[1] == rec.tensor and not attr(node, "transA", 0):
        return node.input[0], 1
    if node.op_type == "MatMul" and node.input[1] == rec.tensor and model.array(rec.tensor).ndim == 2 and rec.axis == 0:
        return node.input[0], -1
    return None


def _effective_columns(model, rec) -> np.ndarray:
    """||W_eff[:, c]||^2 per input column c: the consumer's weight, its output rows times the scale of the BN that
    follows it (the same numbers on a BN-kept and a folded export)."""
    w = np.moveaxis(model.array(rec.tensor).astype(np.float64), rec.axis, 0)  # [C, O, ...] for Conv, Gemm, MatMul
    node = model.nodes[rec.node]
    bn = following_bn(model, node.output[0]) if node.op_type in ("Conv", "Gemm") else None
    if bn is not None and all(model.is_const(i) for i in bn.input[1:5]) and w.ndim >= 2:
        scale, _ = bn_scale_shift(model, bn)
        if len(scale) == w.shape[1]:
            w = w * scale.reshape(1, -1, *([1] * (w.ndim - 2)))
    return (w.reshape(w.shape[0], -1) ** 2).sum(axis=1)


@criteria.register("energy")
class Energy(Criterion):
    description = (
        "E[x_c^2] * ||W_eff[:, c]||^2 over the layers reading channel c: the same on folded and BN-kept exports"
    )
    needs = frozenset({"weights", "activations"})
    tensor_kind = "consumer input"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, model = ctx.analysis, ctx.model
        reads = []
        for rec in an.slice_records:
            if rec.role != "in":
                continue
            found = _reading(model, rec)
            if found is None or len(rec.ids) != np.moveaxis(model.array(rec.tensor), rec.axis, 0).shape[0]:
                continue
            reads.append((rec, *found))
        moments = ChannelMoments(axes={x: axis for _, x, axis in reads})
        if reads:
            capture(model, sorted(moments.axes), ctx.calib, moments, progress=ctx.progress)
        scores = np.zeros(an.n_elements)
        for rec, x, _ in reads:
            e = moments.second_moment(x)
            if len(e) != len(rec.ids):  # the tensor's channels are not the weight's columns (a reshape between)
                continue
            np.add.at(scores, rec.ids, e * _effective_columns(model, rec))
        return self._fallback(an, scores)

    @staticmethod
    def _fallback(an, scores: np.ndarray) -> np.ndarray:
        """Groups no weighted layer reads: the energy of their producers' effective (BN-folded) filters."""
        unit = an.unit_scores(scores)
        for g in an.groups:
            if len(g.units) and not unit[g.units].any():
                for src in an.producers():
                    ids = np.arange(src.start, src.start + src.count)
                    if np.isin(an.unit_of[ids], g.units).any():
                        scores[ids] = (folded_filters(an, src) ** 2).sum(axis=1)
        return scores
