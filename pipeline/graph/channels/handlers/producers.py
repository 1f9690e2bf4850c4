"""Handlers of the ops that create channels: Conv, ConvTranspose (dense, grouped, depthwise), Gemm, MatMul with a
constant weight. Their output channels are new elements; their input side records which weight columns each input
element owns. A grouped conv is pruned by whole groups or by equal widths in every group (``conv_groups``); a
depthwise conv's filters are members of their input channel's unit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Block, Chan, Kind
from carve.pipeline.graph.channels.fixes import GroupFix
from carve.pipeline.graph.channels.handlers.attention import matmul_activations
from carve.pipeline.graph.channels.handlers.table import handles, q
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import attr


@dataclass
class _ConvOperands:
    weight: str
    bias: str | None
    dims: tuple[int, int]  # the weight's first two axes: (Cout, Cin/g) for Conv, (Cin, Cout/g) for ConvTranspose
    group: int
    xin: Chan | None  # the tracked input channels


def _conv_operands(a: Analyser, node: onnx.NodeProto) -> _ConvOperands | None:
    """The operands of a Conv/ConvTranspose; None when they are not constants (its channels are then opaque)."""
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = a.const(w_name)
    xin = a.expect_axis(node, a.get(node.input[0]), 1)
    if w is None or (b_name and a.const(b_name) is None):
        reason = f"the {'weight' if w is None else 'bias'} of {q(node)} is not a constant"
        a.freeze_inputs(node, reason)
        a.opaque(node.output[0], node.name, reason)
        return None
    return _ConvOperands(w_name, b_name, (int(w.shape[0]), int(w.shape[1])), int(attr(node, "group", 1)), xin)


def _grouped_conv(a: Analyser, node: onnx.NodeProto, c: _ConvOperands, *, cin, cout, in_axis, out_axis) -> None:
    """A grouped (not depthwise) Conv: input channel ``j * cin/g + p`` is position p of group j, and the weight axis
    that indexes a group's input positions (axis 1) holds one group's worth. Two ways to keep it a grouped conv,
    chosen by ``Analyser.conv_groups``:

    * ``whole`` (default): all channels of a group (its inputs and outputs) are one unit, so whole groups go; the
      per-group axis stays and ``group`` counts the surviving groups (:class:`GroupFix`);
    * ``width``: position p of every group is one unit (inputs and outputs alike), so every group loses the same
      positions; the per-group axis is cut by group 0's positions and ``group`` stays. A unit spans ``g`` channels,
      so a channel alignment (``round_to``) that ``g`` does not divide rounds to many positions at once."""
    g, w = c.group, a.const(c.weight)
    xin = c.xin
    if xin is None or len(xin) != cin:
        why = "are not tracked" if xin is None else f"number {len(xin)}, the weight expects {cin}"
        reason = f"the input channels of grouped {q(node)} (group={g}) {why}"
        a.freeze_inputs(node, reason)
        ids = a.new(cout, Kind.OUT, node.name, weight=c.weight, axis=out_axis, op=node.op_type)
        a.freeze(ids, reason)
        a.set(node.output[0], Chan(1, ids))
        return
    x = xin.ids.reshape(g, cin // g)
    ids = a.new(cout, Kind.OUT, node.name, weight=c.weight, axis=out_axis, op=node.op_type)
    y = ids.reshape(g, cout // g)
    if a.conv_groups == "width":
        a.union(np.tile(x[0], g - 1), x[1:])
        a.union(np.tile(y[0], g - 1), y[1:])
        a.span(x, g)
        a.span(y, g)
    else:
        a.union(np.repeat(x[:, :1], x.shape[1], axis=1), x)
        a.union(np.repeat(x[:, :1], y.shape[1], axis=1), y)
        a.span(x, x.shape[1])
        a.span(y, y.shape[1])
        a.fixes.append(GroupFix(node.name, x[:, 0]))
    for axis, full, per_group in ((in_axis, x, x[0]), (out_axis, y, y[0])):
        if w.shape[axis] == full.size:
            a.cut(c.weight, axis, full, node, "in" if axis == in_axis else "out")
        elif a.conv_groups == "width":  # whole groups keep every position: that axis is not cut
            a.cut(c.weight, axis, per_group, node, "in" if axis == in_axis else "out")
    if c.bias:
        a.cut(c.bias, 0, ids, node, "out")
    a.set(node.output[0], Chan(1, ids))


def _dense_conv(a: Analyser, node: onnx.NodeProto, w_name, b_name, xin, *, cin, cout, in_axis, out_axis):
    """Output channels are new elements (weight axis ``out_axis``); input channels cut axis ``in_axis``."""
    out = node.output[0]
    if xin is not None:
        if len(xin) != cin:
            a.freeze(xin.ids, f"{q(node)} expects {cin} input channels, the analysis sees {len(xin)}")
        else:
            a.cut(w_name, in_axis, xin.ids, node, "in")
    ids = a.new(cout, Kind.OUT, node.name, weight=w_name, axis=out_axis, op=node.op_type)
    a.cut(w_name, out_axis, ids, node, "out")
    if b_name:
        a.cut(b_name, 0, ids, node, "out")
    a.set(out, Chan(1, ids))


def _depthwise(a: Analyser, node: onnx.NodeProto, w_name, b_name, ids: np.ndarray, per_input: int, rows) -> None:
    """Output channel o comes from input channel ids[o]; ``rows`` (the input channel of each weight row) makes the
    weight's rows members of their input channel's unit."""
    members = a.new(len(rows), Kind.MEMBER, node.name, weight=w_name, axis=0, op=node.op_type)
    a.union(members, rows)
    a.cut(w_name, 0, rows, node, "member")
    if b_name:
        a.cut(b_name, 0, ids, node, "member")
    a.fixes.append(GroupFix(node.name, ids[::per_input]))
    a.set(node.output[0], Chan(1, ids))


def _handles_conv(op: str):
    """Register a Conv-like handler that runs only when the weights (and bias) are constants."""

    def deco(fn):
        @handles(op)
        def handler(a: Analyser, node: onnx.NodeProto) -> None:
            c = _conv_operands(a, node)
            if c is not None:
                fn(a, node, c)

        return fn

    return deco


@_handles_conv("Conv")
def _conv(a: Analyser, node: onnx.NodeProto, c: _ConvOperands) -> None:
    (cout, cin_g), g, xin = c.dims, c.group, c.xin
    if g > 1 and cin_g == 1 and cout % g == 0:
        # depthwise (channel multiplier m = cout/g): output o is computed from input channel o // m only
        m = cout // g
        if xin is not None and len(xin) == g:
            ids = xin.ids
        else:
            ids = a.new(g, Kind.OPAQUE, node.name)
            a.freeze(ids, f"the input channels of depthwise {q(node)} are not tracked")
        ids = np.repeat(ids, m)
        _depthwise(a, node, c.weight, c.bias, ids, m, rows=ids)
        return
    if g > 1:
        _grouped_conv(a, node, c, cin=cin_g * g, cout=cout, in_axis=1, out_axis=0)
        return
    _dense_conv(a, node, c.weight, c.bias, xin, cin=cin_g, cout=cout, in_axis=1, out_axis=0)


@_handles_conv("ConvTranspose")
def _conv_transpose(a: Analyser, node: onnx.NodeProto, c: _ConvOperands) -> None:
    (cin, cout_g), g, xin = c.dims, c.group, c.xin
    if g > 1 and g == cin and xin is not None and len(xin) == cin:
        # depthwise transposed conv: output channels c*m .. c*m+m-1 come from input channel c (weight is Cin x m)
        _depthwise(a, node, c.weight, c.bias, np.repeat(xin.ids, cout_g), cout_g, rows=xin.ids)
        return
    if g > 1:  # its weight holds one group's outputs (Cin x Cout/g): one filter per output channel is not a slice
        reason = f"grouped {q(node)} (group={g}): carve prunes grouped Conv, not grouped ConvTranspose"
        a.freeze_inputs(node, reason)
        a.opaque(node.output[0], node.name, reason)
        return
    _dense_conv(a, node, c.weight, c.bias, xin, cin=cin, cout=cout_g, in_axis=0, out_axis=1)


@handles("Gemm")
def _gemm(a: Analyser, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input[0], node.input[1]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    w = a.const(b_name)
    if w is None or (c_name and a.const(c_name) is None and a.get(c_name) is None):
        a.freeze_inputs(node, f"the weight of {q(node)} is not a constant")
        a.opaque(out, node.name, f"{q(node)} multiplies two activations")
        return
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    xin = a.get(a_name)
    if xin is not None:
        if trans_a or xin.axis != 1:
            a.freeze(xin.ids, f"{q(node)} reads its input transposed")
        elif len(xin) != w.shape[k_axis]:
            a.freeze(xin.ids, f"{q(node)} expects {w.shape[k_axis]} inputs, the analysis sees {len(xin)}")
        else:
            a.cut(b_name, k_axis, xin.ids, node, "in")
    ids = a.new(int(w.shape[n_axis]), Kind.OUT, node.name, weight=b_name, axis=n_axis, op=node.op_type)
    a.cut(b_name, n_axis, ids, node, "out")
    if c_name:
        c = a.const(c_name)
        if c is not None:
            if c.ndim >= 1 and c.shape[-1] == len(ids) and len(ids) > 1:
                a.cut(c_name, c.ndim - 1, ids, node, "out")
        else:  # a channel tensor added as C: like a residual Add
            cc = a.get(c_name)
            if cc is not None and len(cc) == len(ids) and cc.axis == (a.rank(c_name) or 2) - 1:
                a.union(cc.ids, ids)
            elif cc is not None:
                a.freeze(cc.ids, f"{q(node)} broadcasts its C input")
                a.freeze(ids, f"{q(node)} broadcasts its C input")
    a.set(out, Chan(1, ids))


@handles("MatMul", blocks=True)
def _matmul(a: Analyser, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input
    out = node.output[0]
    w = a.const(b_name)
    xin = a.get(a_name)
    ra = a.rank(a_name)
    if w is None and a.const(a_name) is None:
        matmul_activations(a, node)  # attention: q @ k^T, attn @ v
        return
    if isinstance(xin, Block) or isinstance(a.get(b_name), Block):
        a.freeze_inputs(node, f"{q(node)} applies a weight to channels split over several axes")
        a.opaque(out, node.name, f"{q(node)} reads attention heads")
        return
    if w is None or w.ndim != 2 or ra is None:
        a.freeze_inputs(node, f"{q(node)} has no constant 2-D weight")
        a.opaque(out, node.name, f"{q(node)} multiplies two activations")
        return
    if xin is not None and xin.axis < ra - 2:
        # channels on a batch axis of the product: they pass through untouched
        a.set(out, Chan(xin.axis, xin.ids))
        return
    if xin is not None:
        if xin.axis != ra - 1:
            a.freeze(xin.ids, f"{q(node)} contracts over axis {ra - 1}, the channels are on axis {xin.axis}")
        elif len(xin) != w.shape[0]:
            a.freeze(xin.ids, f"{q(node)} expects {w.shape[0]} inputs, the analysis sees {len(xin)}")
        else:
            a.cut(b_name, 0, xin.ids, node, "in")
    ids = a.new(int(w.shape[1]), Kind.OUT, node.name, weight=b_name, axis=1, op=node.op_type)
    a.cut(b_name, 1, ids, node, "out")
    a.set(out, Chan(ra - 1, ids))
