"""im2col: the rows a convolution multiplies (its input patches), or a Gemm/MatMul's feature rows. Data-aware
decomposition and the least-squares repair fit their matrices on these rows.

:func:`patches` builds the whole im2col matrix in the weight's (c, u, v) column order. :func:`patch_rows` gathers only
chosen rows (and input channels) in (u, v, c) order without ever building the full matrix (9x the activation for a
3x3 kernel): one NHWC copy of the padded batch and a single ``np.take`` of ``rows * kh * kw`` contiguous channel
vectors; :func:`uvc_matrix` gives the weight in the matching column order.
"""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.conv import conv_pads
from carve.pipeline.graph.model import Model, attr


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


def conv_geometry(model: Model, node: onnx.NodeProto, x_shape) -> dict:
    """Kernel, strides, dilations, explicit pads and output size of a 2-D Conv on an input of ``x_shape``."""
    w = model.shape(node.input[1])
    kh, kw = int(w[2]), int(w[3])
    top, left, bottom, right = conv_pads(model, node)
    sh, sw = (int(s) for s in attr(node, "strides", [1, 1]))
    dh, dw = (int(d) for d in attr(node, "dilations", [1, 1]))
    _, _, h, wd = x_shape
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + left + right - dw * (kw - 1) - 1) // sw + 1
    return {
        "kh": kh,
        "kw": kw,
        "sh": sh,
        "sw": sw,
        "dh": dh,
        "dw": dw,
        "pads": (top, left, bottom, right),
        "oh": oh,
        "ow": ow,
    }


def patch_rows(
    model: Model,
    node: onnx.NodeProto,
    x: np.ndarray,
    pick: np.ndarray | None = None,
    channels: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``pick`` (indices in :func:`rows`' (n, oy, ox) order; None = all) of a Conv's im2col over the input
    channels ``channels`` (a boolean mask; None = all), columns in (u, v, c) order; Gemm/MatMul: the feature rows."""
    if node.op_type != "Conv":
        m = x.reshape(-1, x.shape[-1])
        if channels is not None:
            m = m[:, channels]
        return np.ascontiguousarray(m if pick is None else m[pick], dtype=np.float32)
    if int(attr(node, "group", 1)) != 1:
        raise CarveError(f"{node.op_type} {node.name!r}: im2col rows of grouped convolutions are not supported")
    g = conv_geometry(model, node, x.shape)
    top, left, bottom, right = g["pads"]
    if channels is not None:
        x = x[:, channels]
    n, c, h, w = x.shape
    hp, wp = h + top + bottom, w + left + right
    xp = np.zeros((n, hp, wp, c), np.float32)
    xp[:, top : top + h, left : left + w] = x.transpose(0, 2, 3, 1)
    flat = xp.reshape(-1, c)
    oh, ow = g["oh"], g["ow"]
    if pick is None:
        pick = np.arange(n * oh * ow)
    b, r = np.divmod(pick, oh * ow)
    oy, ox = np.divmod(r, ow)
    base = (b * hp + oy * g["sh"]) * wp + ox * g["sw"]
    offsets = np.array([u * g["dh"] * wp + v * g["dw"] for u in range(g["kh"]) for v in range(g["kw"])])
    # one gather of rows * kh * kw channel vectors (~6x faster than kh * kw gathers into strided outputs)
    return np.take(flat, (base[:, None] + offsets[None, :]).ravel(), axis=0).reshape(len(pick), -1)


def uvc_matrix(w: np.ndarray) -> np.ndarray:
    """A Conv weight (Cout, C, kh, kw) as Cout x (kh * kw * C), the column order of :func:`patch_rows`."""
    return w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1)


def from_uvc(m: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`uvc_matrix`: back to (Cout, C, kh, kw)."""
    cout, c, kh, kw = shape
    return m.reshape(cout, kh, kw, c).transpose(0, 3, 1, 2)
