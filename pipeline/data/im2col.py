"""im2col: the rows a convolution multiplies (its input patches, in the weight's (c, u, v) order), or a Gemm/MatMul's
feature rows. Data-aware decomposition and the least-squares repair fit their matrices on these rows."""

from __future__ import annotations

import numpy as np
import onnx

from pipeline.graph.conv import conv_pads
from pipeline.graph.model import Model, attr


def patches(model: Model, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """im2col of a Conv's input batch: (N * L) x (Cin * kh * kw) rows, in the weight's (c, u, v) order."""
    import torch
    import torch.nn.functional as F

    w = model.shape(node.input[1])
    kh, kw = int(w[2]), int(w[3])
    top, left, bottom, right = conv_pads(model, node)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if any((top, left, bottom, right)):
        t = F.pad(t, (left, right, top, bottom))
    cols = F.unfold(
        t, (kh, kw), dilation=tuple(attr(node, "dilations", [1, 1])), stride=tuple(attr(node, "strides", [1, 1]))
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def rows(model: Model, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """The input rows a linear node multiplies: conv patches, or Gemm/MatMul rows."""
    if node.op_type == "Conv":
        return patches(model, node, x)
    return x.reshape(-1, x.shape[-1])
