"""Handlers of ops that rearrange channels: Concat (vectors concatenated), Split and Slice (cut; a block of attention
heads split into Q, K and V), Pad (constant channels are new elements), Gather (picked by constant indices; rows of a
constant embedding table are a producer)."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Block, Chan, Kind, Layout, layout, parts
from carve.pipeline.graph.channels.fixes import (
    BlockSliceFix,
    GatherFix,
    PadFix,
    ReshapeFix,
    SlabGatherFix,
    SliceFix,
    SplitFix,
)
from carve.pipeline.graph.channels.handlers.shape import shape_refs
from carve.pipeline.graph.channels.handlers.table import handles, handles_channels, q
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import attr


@handles("Concat")
def _concat(a: Analyser, node: onnx.NodeProto) -> None:
    out = node.output[0]
    r = a.rank(out) or max((a.rank(i) or 0) for i in node.input if i)
    axis = int(attr(node, "axis", 0)) % r
    chans = [(i, a.get(i)) for i in node.input if i]
    tracked = [c for _, c in chans if c is not None]
    if not tracked:
        return
    if all(c is None or c.axis == axis for _, c in chans):
        parts = []
        for i, c in chans:
            if c is not None:
                parts.append(c.ids)
                continue
            shp = a.model.shape(i)
            n = None if shp is None else shp[axis]
            if n is None:
                a.freeze(np.concatenate([c.ids for c in tracked]), f"{q(node)} concatenates {i!r} of unknown size")
                return
            if a.const(i) is not None:
                ids = a.new(int(n), Kind.CONST, i, op="Concat")
                a.cut(i, axis, ids, node, "const")
            else:
                ids = a.new(int(n), Kind.OPAQUE, i)
                a.freeze(ids, f"concatenated by {q(node)} from {i!r}, whose channels carve does not track")
            parts.append(ids)
        a.set(out, Chan(axis, np.concatenate(parts)))
        return
    # concatenation along another axis: all operands carry the same channels
    _elementwise_like_concat(a, node, chans, axis)


def _elementwise_like_concat(a: Analyser, node: onnx.NodeProto, chans: list, cat_axis: int) -> None:
    tracked = [c for _, c in chans if c is not None]
    axis = tracked[0].axis
    if any(c.axis != axis or len(c) != len(tracked[0]) for c in tracked):
        for c in tracked:
            a.freeze(c.ids, f"{q(node)} joins tensors whose channels do not line up")
        a.set(node.output[0], tracked[0])
        return
    ref = tracked[0].ids
    for c in tracked[1:]:
        a.union(ref, c.ids)
    r_out = a.rank(node.output[0])
    for i, c in chans:
        if c is None:
            if a.const(i) is not None and a.const(i).shape[axis] == len(ref):
                a.cut(i, axis, ref, node, "param")
            elif not cut_behind_expand(a, i, axis, r_out, ref):
                a.freeze(ref, f"{q(node)} joins them with {i!r}, whose channels carve does not track")
    a.set(node.output[0], Chan(axis, ref))


def cut_behind_expand(a: Analyser, name: str, axis: int, rank: int | None, ids: np.ndarray) -> bool:
    """``name`` is a constant broadcast by Expand (a class token ``cls_token.expand(B, -1, -1)``): cut the constant
    with the channels ``ids`` (on ``axis`` of a tensor of rank ``rank``). False when it is not."""
    node = a.model.producer.get(name)
    if node is None or node.op_type != "Expand" or rank is None:
        return False
    v = a.const(node.input[0])
    if v is None or len(a.model.consumers.get(node.input[0], [])) != 1:
        return False
    k = axis - (rank - v.ndim)
    if k < 0 or v.shape[k] != len(ids):
        return False
    entries = shape_refs(a.model, node.input[1], node)
    pos = None if entries is None else axis - (rank - len(entries))
    if entries is None or pos is None or pos < 0:
        return False
    e = entries[pos]
    if e.value is not None and e.value > 1 and e.where is not None:
        a.fixes.append(ReshapeFix(node.name, [axis], [e.where], ids))  # the expanded channel count follows the cut
    elif e.value != 1:
        return False
    a.cut(node.input[0], k, ids, node, "param")
    return True


@handles_channels("Split", blocks=True)
def _split(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    axis = int(attr(node, "axis", 0)) % r
    if axis not in c.axes:
        for o in node.output:
            a.set(o, c)
        return
    if isinstance(c, Block):
        _split_block(a, node, c, axis)
        return
    sizes = _split_sizes(a, node, len(c))
    if sizes is None:
        _split_at_run_time(a, node, c.ids, "the channel axis")
        return
    bounds = np.cumsum([0, *sizes])
    segments = [c.ids[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]
    for o, seg in zip(node.output, segments):
        a.set(o, Chan(axis, seg))
    a.fixes.append(SplitFix(node.name, segments))


def _split_at_run_time(a: Analyser, node: onnx.NodeProto, ids: np.ndarray, what: str) -> None:
    """A Split whose sizes are known only at run time: its input's channels are frozen, its outputs opaque."""
    a.freeze(ids, f"{q(node)} splits {what} by sizes computed at run time")
    for o in node.output:
        a.opaque(o, node.name, f"split by {q(node)}")


def _split_block(a: Analyser, node: onnx.NodeProto, c: Block, axis: int) -> None:
    """A block split along one of its axes (fused QKV: ``[3, heads, head_dim]`` along the first; C2PSA's per-head
    ``[q | k | v]`` along the last): each output carries its part of the block."""
    k = c.axes.index(axis)
    sizes = _split_sizes(a, node, c.ids.shape[k])
    if sizes is None:
        _split_at_run_time(a, node, c.ids, "attention heads")
        return
    bounds = np.cumsum([0, *sizes])
    segments = [np.take(c.ids, np.arange(bounds[j], bounds[j + 1]), axis=k) for j in range(len(sizes))]
    for o, seg in zip(node.output, segments):
        a.set(o, layout(c.axes, seg))
    a.fixes.append(SplitFix(node.name, segments, k))


def _split_sizes(a: Analyser, node: onnx.NodeProto, total: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        v = a.const(node.input[1])
        return None if v is None else [int(x) for x in v]
    s = attr(node, "split")
    if s is not None:
        return [int(x) for x in s]
    k = int(attr(node, "num_outputs", len(node.output)))
    step = -(-total // k)  # ceil: the last chunk may be smaller (opset 18 semantics)
    sizes = [min(step, total - i * step) for i in range(k)]
    return sizes if all(s > 0 for s in sizes) else None


@handles_channels("Slice", blocks=True)
def _slice(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    vals = [a.const(i) if len(node.input) > k and i else None for k, i in enumerate(node.input)]
    if any(len(node.input) > k and node.input[k] and vals[k] is None for k in range(1, len(node.input))):
        a.freeze(c.ids, f"{q(node)} slices with bounds computed at run time")
        a.opaque(node.output[0], node.name, f"sliced by {q(node)}")
        return
    starts, ends = list(vals[1]), list(vals[2])
    axes = list(vals[3]) if len(vals) > 3 and vals[3] is not None else list(range(len(starts)))
    steps = list(vals[4]) if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
    axes = [int(x) % r for x in axes]
    if not set(axes) & set(c.axes):
        a.set(node.output[0], c)
        return
    if isinstance(c, Block):
        _slice_block(a, node, c, axes, starts, ends, steps)
        return
    k = axes.index(c.axis)
    n = len(c)
    start, end, step = int(starts[k]), int(ends[k]), int(steps[k])
    idx = np.arange(n)[slice(start, end, step)]
    if step != 1 or len(idx) == 0:
        a.freeze(c.ids, f"{q(node)} takes every {step}th channel" if step != 1 else f"{q(node)} selects no channel")
        a.set(node.output[0], Chan(c.axis, c.ids[idx]))
        return
    a.set(node.output[0], Chan(c.axis, c.ids[idx]))
    a.fixes.append(SliceFix(node.name, k, c.ids, int(idx[0]), int(idx[0]) + len(idx)))


def _slice_block(a: Analyser, node: onnx.NodeProto, c: Block, axes, starts, ends, steps) -> None:
    """A block sliced along one of its axes with step 1 (``unbind`` as the dynamo exporter writes it: a Slice
    ``[k:k+1]`` of the fused-QKV axis, then Squeeze): that part of the block."""
    hit = [j for j, x in enumerate(axes) if x in c.axes]
    j = hit[0]
    k = c.axes.index(axes[j])
    n = c.ids.shape[k]
    idx = np.arange(n)[slice(int(starts[j]), int(ends[j]), int(steps[j]))]
    if len(hit) > 1 or int(steps[j]) != 1 or len(idx) == 0:
        a.freeze(c.ids, f"{q(node)} slices attention heads in a way carve cannot follow")
        a.opaque(node.output[0], node.name, f"sliced by {q(node)}")
        return
    before = np.take(c.ids, np.arange(int(idx[0])), axis=k)
    part = np.take(c.ids, idx, axis=k)
    if before.size:
        a.lockstep_lines(before)  # the new start counts what is kept before it: equal in every line
    a.set(node.output[0], layout(c.axes, part))
    a.fixes.append(BlockSliceFix(node.name, j, k, before, part))


@handles_channels("Pad")
def _pad(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    pads = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "pads")
    axes_in = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or (len(node.input) > 3 and node.input[3] and axes_in is None):
        a.freeze(c.ids, f"{q(node)} pads by amounts computed at run time")
        a.opaque(node.output[0], node.name, f"padded by {q(node)}")
        return
    pads = [int(p) for p in pads]
    axes = [int(x) % r for x in axes_in] if axes_in is not None else list(range(r))
    if c.axis not in axes:
        a.set(node.output[0], c)
        return
    k = axes.index(c.axis)
    before, after = pads[k], pads[k + len(axes)]
    if before == 0 and after == 0:
        a.set(node.output[0], c)
        return
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or before < 0 or after < 0:
        a.freeze(c.ids, f"{q(node)} pads the channel axis in mode {mode!r}")
        a.opaque(node.output[0], node.name, f"padded by {q(node)}")
        return
    b_ids = a.new(before, Kind.PAD, node.name)
    e_ids = a.new(after, Kind.PAD, node.name)
    a.set(node.output[0], Chan(c.axis, np.concatenate([b_ids, c.ids, e_ids])))
    a.fixes.append(PadFix(node.name, k, len(axes), b_ids, e_ids))


@handles("Gather", blocks=True)
def _gather_node(a: Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        _embedding(a, node)
        return
    r = a.rank(node.input[0])
    if isinstance(c, Block):
        _gather_block(a, node, c, r)
        return
    _gather(a, node, c, r)


def _embedding(a: Analyser, node: onnx.NodeProto) -> None:
    """Rows of a constant table picked by run-time indices (``nn.Embedding``): a producer whose output channels are
    the table's columns."""
    table = a.const(node.input[0])
    if table is None or table.ndim != 2 or int(attr(node, "axis", 0)) != 0 or a.const(node.input[1]) is not None:
        return
    if not np.issubdtype(table.dtype, np.floating):
        return
    r_out = a.rank(node.output[0])
    if r_out is None:
        return
    ids = a.new(int(table.shape[1]), Kind.OUT, node.name, weight=node.input[0], axis=1, op="Gather")
    a.cut(node.input[0], 1, ids, node, "out")
    a.set(node.output[0], Chan(r_out - 1, ids))


def _gather_block(a: Analyser, node: onnx.NodeProto, c: Block, r: int | None) -> None:
    """A scalar index on an axis of a block (``qkv[0]``, as ``unbind`` exports): that part of the block."""
    axis = int(attr(node, "axis", 0)) % r
    idx = a.const(node.input[1])
    axes, ids = parts(c)
    if axis not in axes:
        if idx is None or idx.ndim > 1:
            a.freeze(c.ids, f"{q(node)} gathers with indices that change the rank")
            return
        shift = 1 if idx.ndim == 0 else 0
        a.set(node.output[0], layout([x - (shift if x > axis else 0) for x in axes], ids))
        return
    if idx is None or idx.ndim != 0:
        a.freeze(c.ids, f"{q(node)} picks attention channels by indices carve cannot follow")
        a.opaque(node.output[0], node.name, f"gathered by {q(node)}")
        return
    k = axes.index(axis)
    index = int(idx) % ids.shape[k]
    part = np.take(ids, index, axis=k)
    a.fixes.append(SlabGatherFix(node.name, ids, k, index))
    rest = [x - (1 if x > axis else 0) for x in axes if x != axis]
    if len(rest) == 1 and len(np.unique(part)) != part.size:
        a.freeze(c.ids, f"{q(node)} picks attention channels carve cannot follow")
        return
    # the other parts of the block are dropped here: they must not be removed on their own
    a.set(node.output[0], layout(rest, part))


def _gather(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    axis = int(attr(node, "axis", 0)) % r
    idx = a.const(node.input[1])
    if axis != c.axis:
        if idx is None or idx.ndim > 1:
            a.freeze(c.ids, f"{q(node)} gathers with indices that change the rank")
            return
        a.set(node.output[0], Chan(c.axis - (1 if axis < c.axis and idx.ndim == 0 else 0), c.ids))
        return
    if idx is None or idx.ndim != 1:
        a.freeze(c.ids, f"{q(node)} picks channels by indices carve cannot follow")
        a.opaque(node.output[0], node.name, f"gathered by {q(node)}")
        return
    idx = np.where(idx < 0, idx + len(c), idx).astype(np.int64)
    a.set(node.output[0], Chan(axis, c.ids[idx]))
    a.fixes.append(GatherFix(node.name, c.ids, idx))
