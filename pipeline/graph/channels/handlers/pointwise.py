"""Handlers of per-channel and elementwise ops: activations, Clip, pools, normalisations (LayerNorm over channels: an
inexact statistic), Softmax, binary and n-ary elementwise ops (residual ``Add``, SE gating ``Mul``: union index by
index; blocks of attention heads likewise), Q/DQ."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Block, Chan, layout, parts
from carve.pipeline.graph.channels.handlers.table import handles, handles_channels, q
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import attr

_UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Mish Gelu Erf Exp Log Sqrt "
    "Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos ThresholdedRelu Shrink Identity Dropout Cast CastLike Not "
    "IsNaN IsInf Relu6 Swish"
).split()


@handles(*_UNARY, blocks=True)
def _unary(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    for o in node.output:  # Dropout's mask carries the same channels
        a.set(o, c)


@handles("Clip")
def _clip(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    for i in node.input[1:]:
        if i and a.const(i) is None:
            # data-dependent limits: fine as long as they are scalars (shape ())
            shp = a.model.shape(i)
            if shp is None or len(shp) != 0:
                a.freeze_inputs(node, f"{q(node)} has non-scalar limits")
    a.set(node.output[0], c)


@handles("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def _pool(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.expect_axis(node, a.get(node.input[0]), 1)
    a.set(node.output[0], c)
    if len(node.output) > 1 and node.output[1] and c is not None:
        # MaxPool indices are flat offsets that include the channel index
        a.freeze(c.ids, f"the indices output of {q(node)} encodes channel positions")


@handles("BatchNormalization", "InstanceNormalization")
def _norm(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.expect_axis(node, a.get(node.input[0]), 1)
    params = [p for p in node.input[1:] if p]
    if c is not None:
        if not all(a.const(p) is not None for p in params):
            a.freeze(c.ids, f"the parameters of {q(node)} are not constants")
        else:
            for p in params:
                if a.const(p).shape[0] == len(c):
                    a.cut(p, 0, c.ids, node, "param")
                else:
                    a.freeze(c.ids, f"parameter {p!r} of {q(node)} does not match the channel count")
    a.set(node.output[0], c)


@handles("GroupNormalization", "LRN", "MeanVarianceNormalization")
def _mixing_norm(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is not None:
        r = a.rank(node.input[0])
        mixes = True
        if node.op_type == "MeanVarianceNormalization" and r is not None:
            mixes = c.axis % r in [int(x) % r for x in attr(node, "axes", [0, 2, 3])]
        if mixes:
            a.freeze(c.ids, f"{q(node)} normalises across channels")
    a.set(node.output[0], c)


LN_REASON = "{node} normalises across them: removing channels changes its statistics (not an exact removal)"


@handles("LayerNormalization")
def _layer_norm(a: Analyser, node: onnx.NodeProto) -> None:
    """Over axes that do not hold the channels: per-position, channels pass through. Over the channels (the residual
    stream of a transformer, ConvNeXt's channels-last norm): the channels stay prunable, but a removal changes the
    mean and variance the norm computes: it is recorded as a statistic (an inexact removal), and the scale and bias
    are cut with the channels."""
    c = a.get(node.input[0])
    r = a.rank(node.input[0])
    if c is None:
        return
    first = int(attr(node, "axis", -1)) % r if r is not None else None
    if first is not None and c.axis < first:
        a.set(node.output[0], c)
        return
    extra = [o for o in node.output[1:] if o and a.model.consumers.get(o)]
    params = [p for p in node.input[1:3] if p]

    def cut_axis(p: str) -> int | None:  # the scale/bias axis that holds the channels (they broadcast from the right)
        v = a.const(p)
        k = None if v is None else v.ndim - (r - c.axis)
        return k if k is not None and k >= 0 and v.shape[k] == len(c) else None

    shapes_ok = r is not None and all(cut_axis(p) is not None for p in params)
    if extra or not shapes_ok:
        why = "also outputs its statistics" if extra else "has scale or bias carve cannot cut"
        a.freeze(c.ids, f"{q(node)} normalises across channels and {why}")
        a.set(node.output[0], c)
        return
    for p in params:
        a.cut(p, cut_axis(p), c.ids, node, "param")
    a.stat(node, "layernorm", c, LN_REASON.format(node=q(node)))
    a.set(node.output[0], c)


@handles("Softmax", "LogSoftmax", "Hardmax", blocks=True)
def _softmax(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    r = a.rank(node.input[0])
    if c is not None and r is not None:
        default = -1 if a.model.opset >= 13 else 1
        ax = int(attr(node, "axis", default)) % r
        if ax in c.axes or (a.model.opset < 13 and ax <= max(c.axes)):
            a.freeze(c.ids, f"{q(node)} normalises across channels")
            if isinstance(c, Block):
                a.opaque(node.output[0], node.name, f"normalised by {q(node)}")
                return
    a.set(node.output[0], c)


@handles(
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Pow",
    "PRelu",
    "Mod",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "Where",
    "BitShift",
    blocks=True,
)
def _elementwise(a: Analyser, node: onnx.NodeProto) -> None:
    if any(isinstance(a.get(i), Block) for i in node.input if i):
        _elementwise_blocks(a, node)
        return
    out = node.output[0]
    r_out = a.rank(out)
    ins = [i for i in node.input if i]
    if r_out is None:
        r_out = max((a.rank(i) or 0) for i in ins)
    chans = [(i, a.get(i)) for i in ins]
    # position of each operand's channel axis in output coordinates
    aligned = {i: r_out - (a.rank(i) or r_out) + c.axis for i, c in chans if c is not None}
    if not aligned:
        return
    out_shape = a.model.shape(out)
    axes = set(aligned.values())
    if len(axes) > 1:
        _mixed_axes(a, node, chans, r_out)
        return
    axis = axes.pop()
    width = max(len(c) for _, c in chans if c is not None)
    if out_shape is not None and out_shape[axis] is not None:
        width = int(out_shape[axis])
    full = [c for _, c in chans if c is not None and len(c) == width]
    for i, c in chans:
        if c is not None and len(c) != width:
            a.freeze(c.ids, f"{q(node)} broadcasts {i!r} over the channel axis")
    if not full:
        return
    ref = full[0].ids
    for c in full[1:]:
        a.union(ref, c.ids)
    for i, c in chans:
        if c is None:
            _untracked_operand(a, node, i, axis, r_out, width, ref)
    a.set(out, Chan(axis, ref))


def _mixed_axes(a: Analyser, node: onnx.NodeProto, chans: list, r_out: int) -> None:
    """Operands whose channels lie on different axes: all frozen; the output follows the first operand's."""
    for _, c in chans:
        if c is not None:
            a.freeze(c.ids, f"{q(node)} combines tensors whose channels lie on different axes")
    first = next(c for _, c in chans if c is not None)
    first_input = next(i for i in node.input if i)
    a.set(node.output[0], Chan(r_out - (a.rank(first_input) or r_out) + first.axis, first.ids))


def _untracked_operand(
    a: Analyser, node: onnx.NodeProto, i: str, axis: int, r_out: int, width: int, ref: np.ndarray
) -> None:
    """An operand without tracked channels: no coupling when it broadcasts along the channel axis, a parameter cut
    with the channels when it is a constant of their width, else the channels are frozen."""
    shp = a.model.shape(i)
    r = len(shp) if shp is not None else None
    cax = None if r is None else axis - (r_out - r)
    dim = None if (shp is None or cax is None or cax < 0) else shp[cax]
    if cax is not None and (cax < 0 or dim == 1):
        return  # broadcast along the channels: no coupling
    if a.const(i) is not None and dim == width:
        a.cut(i, cax, ref, node, "param")
    else:
        a.freeze(ref, f"{q(node)} combines them with {i!r}, whose channels carve does not track")


def _elementwise_blocks(a: Analyser, node: onnx.NodeProto) -> None:
    """Elementwise ops on attention blocks: blocks on the same axes are unioned position by position; any other
    operand must broadcast over every axis of the block (a scale, a mask); else the block is frozen."""
    out = node.output[0]
    ins = [i for i in node.input if i]
    r_out = a.rank(out) or max((a.rank(i) or 0) for i in ins)
    blocks: list[tuple[tuple[int, ...], np.ndarray]] = []
    others: list[str] = []
    for i in ins:
        c = a.get(i)
        rank = a.rank(i)
        shift = r_out - (r_out if rank is None else rank)
        if isinstance(c, Block):
            axes, ids = parts(c)
            blocks.append((tuple(x + shift for x in axes), ids))
        elif c is not None:
            others.append(i)
        else:
            shp = a.model.shape(i)
            if shp is None or any(shp[x - shift] != 1 for x in blocks_axes(a, node, r_out) if x - shift >= 0):
                others.append(i)
    first_axes, first_ids = blocks[0]
    ok = not others and all(ax == first_axes and ids.shape == first_ids.shape for ax, ids in blocks)
    if not ok:
        for i in ins:
            if a.get(i) is not None:
                a.freeze(
                    a.get(i).ids,
                    f"{q(node)} combines attention heads with {(others or ins)[0]!r}, "
                    "which carve cannot line up with them",
                )
        a.opaque(out, node.name, f"produced by {q(node)} from attention heads")
        return
    for _, ids in blocks[1:]:
        a.union(first_ids, ids)
    a.set(out, layout(first_axes, first_ids))


def blocks_axes(a: Analyser, node: onnx.NodeProto, r_out: int) -> set[int]:
    """The output axes the node's block operands hold their channels on."""
    out: set[int] = set()
    for i in node.input:
        c = a.get(i) if i else None
        if isinstance(c, Block):
            shift = r_out - a.rank(i)
            out.update(x + shift for x in c.axes)
    return out


@handles_channels("QuantizeLinear", "DequantizeLinear")
def _qdq(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    axis = int(attr(node, "axis", 1)) % r
    for p in node.input[1:]:
        v = a.const(p) if p else None
        if not p or (v is not None and v.size == 1):
            continue
        if v is not None and v.ndim == 1 and axis == c.axis and len(v) == len(c):
            a.cut(p, 0, c.ids, node, "param")
        else:
            a.freeze(c.ids, f"{q(node)} quantises with parameters carve cannot follow")
    a.set(node.output[0], c)


@handles("Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform")
def _source_of_constants(a: Analyser, node: onnx.NodeProto) -> None:
    """They read no channel tensor: nothing to track."""
