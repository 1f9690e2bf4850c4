"""Handlers of per-channel and elementwise ops: activations, Clip, pools, normalisations, Softmax, binary and n-ary
elementwise ops (residual ``Add``, SE gating ``Mul``: union index by index), Q/DQ."""

from __future__ import annotations

import onnx

from carve.pipeline.graph.channels.elements import Chan
from carve.pipeline.graph.channels.handlers.table import handles, handles_channels, q
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import attr

_UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Mish Gelu Erf Exp Log Sqrt "
    "Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos ThresholdedRelu Shrink Identity Dropout Cast CastLike Not "
    "IsNaN IsInf Relu6 Swish"
).split()


@handles(*_UNARY)
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


@handles("LayerNormalization", "GroupNormalization", "LRN", "MeanVarianceNormalization")
def _mixing_norm(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is not None:
        r = a.rank(node.input[0])
        mixes = True
        if node.op_type == "LayerNormalization" and r is not None:
            first = int(attr(node, "axis", -1)) % r
            mixes = c.axis >= first
        elif node.op_type == "MeanVarianceNormalization" and r is not None:
            mixes = c.axis % r in [int(x) % r for x in attr(node, "axes", [0, 2, 3])]
        if mixes:
            a.freeze(c.ids, f"{q(node)} normalises across channels")
    a.set(node.output[0], c)


@handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    r = a.rank(node.input[0])
    if c is not None and r is not None:
        default = -1 if a.model.opset >= 13 else 1
        ax = int(attr(node, "axis", default)) % r
        if ax == c.axis or (a.model.opset < 13 and ax <= c.axis):
            a.freeze(c.ids, f"{q(node)} normalises across channels")
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
)
def _elementwise(a: Analyser, node: onnx.NodeProto) -> None:
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
        for _, c in chans:
            if c is not None:
                a.freeze(c.ids, f"{q(node)} combines tensors whose channels lie on different axes")
        first = next(c for _, c in chans if c is not None)
        a.set(out, Chan(r_out - (a.rank(ins[0]) or r_out) + first.axis, first.ids))
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
        if c is not None:
            continue
        val = a.const(i)
        shp = a.model.shape(i)
        r = len(shp) if shp is not None else None
        cax = None if r is None else axis - (r_out - r)
        dim = None if (shp is None or cax is None or cax < 0) else shp[cax]
        if cax is not None and (cax < 0 or dim == 1):
            continue  # broadcast along the channels: no coupling
        if val is not None and dim == width:
            a.cut(i, cax, ref, node, "param")
        else:
            a.freeze(ref, f"{q(node)} combines them with {i!r}, whose channels carve does not track")
    a.set(out, Chan(axis, ref))


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
