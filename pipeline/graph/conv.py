"""Convolution and pooling geometry: explicit pads with ``auto_pad`` resolved. One definition for the graph rewrites,
im2col and the PyTorch runner."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from carve.pipeline.graph.model import Model, attr


def resolve_pads(
    auto_pad: str | bytes,
    pads: Sequence[int] | None,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> list[int]:
    """ONNX pads ``[b1, b2, ..., e1, e2, ...]`` of a conv/pool over spatial ``in_sizes``: ``NOTSET`` keeps ``pads``,
    ``VALID`` is no padding, ``SAME_UPPER``/``SAME_LOWER`` pad so that out = ceil(in / stride), the odd pixel at the
    end (upper) or the beginning (lower)."""
    auto = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    nd = len(kernel)
    strides = list(strides or [1] * nd)
    dilations = list(dilations or [1] * nd)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for k in range(nd):
            out = math.ceil(in_sizes[k] / strides[k])
            total = max(0, (out - 1) * strides[k] + (kernel[k] - 1) * dilations[k] + 1 - in_sizes[k])
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin + end
    if auto == "VALID":
        return [0] * (2 * nd)
    return [int(p) for p in (pads if pads is not None else [0] * (2 * nd))]


def conv_pads(model: Model, node: onnx.NodeProto) -> list[int]:
    """Explicit [top, left, bottom, right] pads of a 2-D Conv (auto_pad resolved from its input shape)."""
    w = model.shape(node.input[1])
    kernel = [int(d) for d in w[2:]]
    auto = attr(node, "auto_pad", "NOTSET")
    x = model.shape(node.input[0]) if auto not in ("NOTSET", b"NOTSET", "VALID", b"VALID") else None
    return resolve_pads(
        auto,
        attr(node, "pads", None),
        [int(d) for d in x[2:]] if x else [0] * len(kernel),
        kernel,
        attr(node, "strides", None),
        attr(node, "dilations", None),
    )
