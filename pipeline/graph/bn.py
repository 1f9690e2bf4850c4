"""BatchNormalization as graph facts: the BN that alone follows a producer, its affine form y = scale * x + shift, and
a producer's filters with that BN folded in (what criteria and fusion compare, papers.md sections 3, 5 and 6)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.graph.channels import ChannelAnalysis, Source
from carve.pipeline.graph.model import Model, attr


def following_bn(model: Model, tensor: str):
    """The BatchNormalization node that alone reads ``tensor`` (a producer's output), or None."""
    users = model.consumers.get(tensor, [])
    if len(users) == 1 and users[0].op_type == "BatchNormalization" and users[0].input[0] == tensor:
        return users[0]
    return None


def bn_scale_shift(model: Model, bn) -> tuple[np.ndarray, np.ndarray]:
    """y = scale * x + shift for an inference-mode BatchNormalization node."""
    gamma, beta, mean, var = (model.array(i).astype(np.float64) for i in bn.input[1:5])
    scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def folded_filters(analysis: ChannelAnalysis, source: Source, *, with_bias: bool = False) -> np.ndarray:
    """A producer's filters with the BatchNormalization that follows it folded in (rows = output channels).

    ``with_bias`` appends the folded bias as a last column: the augmented filter [w; b] of papers.md section 6.
    """
    model = analysis.model
    w = analysis.filters(source).astype(np.float64)
    node = model.nodes[source.name]
    b = np.zeros(len(w))
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        b = model.array(node.input[2]).astype(np.float64)
    elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = model.array(node.input[2]).astype(np.float64)
        b = np.broadcast_to(c.reshape(-1) if c.size == len(w) else c.reshape(-1)[:1], (len(w),)).copy()
    bn = following_bn(model, node.output[0])
    if bn is not None and model.shape(bn.input[1]) == (len(w),) and all(model.is_const(i) for i in bn.input[1:5]):
        scale, shift = bn_scale_shift(model, bn)
        w = w * scale[:, None]
        b = b * scale + shift
    return np.concatenate([w, b[:, None]], axis=1) if with_bias else w
