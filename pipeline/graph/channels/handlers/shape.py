"""Handlers of shape-changing ops: Flatten and Reshape (channels merged with the dims after them, as Flatten -> Gemm
does), Transpose, Squeeze/Unsqueeze, reductions, Resize, Expand, Tile, and Shape/Size (harmless unless the channel
count is read at run time)."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Chan
from carve.pipeline.graph.channels.fixes import ReshapeFix, ShapeEntryFix
from carve.pipeline.graph.channels.handlers.table import handles_channels, q
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import Model, attr


@handles_channels("Flatten")
def _flatten(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    shp = a.model.shape(node.input[0])
    r = len(shp) if shp else None
    axis = int(attr(node, "axis", 1)) % (r or 1)
    if r is None:
        a.freeze(c.ids, f"{q(node)} flattens a tensor of unknown rank")
        return
    if c.axis < axis:
        a.set(node.output[0], c)  # channels stay on the outer (first) axis
        return
    dims = shp[axis:]
    if axis == 0 or any(d is None for d in dims):
        a.freeze(c.ids, f"{q(node)} flattens the channels with dynamic dimensions")
        a.opaque(node.output[0], node.name, f"flattened by {q(node)}")
        return
    inner = int(np.prod(shp[c.axis + 1 :], dtype=np.int64))
    outer = int(np.prod(shp[axis : c.axis], dtype=np.int64))
    a.set(node.output[0], Chan(1, np.tile(np.repeat(c.ids, inner), outer)))


@handles_channels("Reshape")
def _reshape(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    """Followed when the channel axis keeps its place and merges only with the dims right after it (Flatten-like,
    e.g. ``x.view(x.size(0), -1)``); a Reshape that splits the channel axis (channel shuffle) freezes it."""
    ins = a.model.shape(node.input[0])
    entries = shape_entries(a.model, node.input[1])
    ax = c.axis
    tail = _reshape_tail(ins, entries, ax, node.input[0])
    if tail is None:
        a.freeze(c.ids, f"{q(node)} reshapes to a shape carve cannot see")
        a.opaque(node.output[0], node.name, f"reshaped by {q(node)}")
        return
    tail_in = ins[ax:]
    # output axis `ax` is the channel axis merged with the j-1 dims right after it; what follows may be reshaped freely
    acc, j = 1, None
    for k, d in enumerate(tail_in):
        acc *= int(d)
        if acc == tail[0]:
            j = k + 1
            break
        if acc > tail[0]:
            break
    explicit = entries[ax] is not None and not isinstance(entries[ax], tuple) and entries[ax] > 0
    fixable = not explicit or a.const(node.input[1]) is not None
    if j is not None and fixable and np.prod(tail_in[j:], dtype=np.int64) == np.prod(tail[1:], dtype=np.int64):
        inner = int(np.prod(tail_in[1:j], dtype=np.int64))
        a.set(node.output[0], Chan(ax, np.repeat(c.ids, inner)))
        if explicit:
            a.fixes.append(ReshapeFix(node.name, ax, c.ids, inner))
        return
    a.freeze(c.ids, f"{q(node)} reshapes the channel axis")
    a.opaque(node.output[0], node.name, f"reshaped by {q(node)}")


def _reshape_tail(ins, entries, ax: int, data: str) -> list[int] | None:
    """The output dims from the channel axis on, when the dims before it are copied from the input unchanged."""
    if ins is None or entries is None or len(entries) <= ax or any(d is None for d in ins[ax:]):
        return None
    rest = entries[ax:]
    for k, e in enumerate(entries[:ax]):
        same = e == 0 or e == ("dim", data, k) or (isinstance(e, int) and ins[k] is not None and e == ins[k])
        # a -1 before the channel axis (e.g. [-1, C*H*W]) is the batch when the tail holds every other element
        inferred = e == -1 and k == 0 and ax == 1 and all(isinstance(x, int) and x > 0 for x in rest)
        if not (same or inferred):
            return None
    if any(not isinstance(e, int) for e in rest) or sum(e == -1 for e in rest) > 1:
        return None
    total = int(np.prod(ins[ax:], dtype=np.int64))
    dims = [int(ins[ax + k]) if e == 0 else e for k, e in enumerate(rest)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims if int(np.prod(dims, dtype=np.int64)) == total else None


def shape_entries(model: Model, name: str, depth: int = 6) -> list | None:
    """The entries of a 1-D shape tensor: ints where constant, ``("dim", tensor, k)`` where it reads dimension k of a
    tensor at run time (``x.size(0)``), None where unknown; None overall when the tensor cannot be followed."""
    if model.is_const(name):
        v = model.array(name)
        return [int(x) for x in np.ravel(v)] if v.ndim <= 1 else None
    node = model.producer.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == "Concat":
        parts = [shape_entries(model, i, depth - 1) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
        inner = shape_entries(model, node.input[0], depth - 1)
        return inner if inner is not None and len(inner) <= 1 else None
    src = model.producer.get(node.input[0]) if node.op_type == "Gather" else None
    if src is not None and src.op_type == "Shape" and model.is_const(node.input[1]):
        start = int(attr(src, "start", 0))
        return [("dim", src.input[0], start + int(k)) for k in np.ravel(model.array(node.input[1]))]
    return None


@handles_channels("Transpose")
def _transpose(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    perm = attr(node, "perm")
    perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
    a.set(node.output[0], Chan(perm.index(c.axis), c.ids))


@handles_channels("Squeeze", "Unsqueeze")
def _squeeze(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    r_in = a.rank(node.input[0])
    axes = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if axes is None and node.op_type == "Squeeze":
        shp = a.model.shape(node.input[0])
        if shp is None or any(d is None for d in shp):
            a.freeze(c.ids, f"{q(node)} squeezes unknown axes")
            return
        axes = [k for k, d in enumerate(shp) if d == 1]
    axes = [int(x) for x in axes]
    if node.op_type == "Squeeze":
        axes = [x % r_in for x in axes]
        if c.axis in axes:
            a.freeze(c.ids, f"{q(node)} removes the channel axis")
            return
        a.set(node.output[0], Chan(c.axis - sum(1 for x in axes if x < c.axis), c.ids))
    else:
        r_out = r_in + len(axes)
        axes = sorted(x % r_out for x in axes)
        pos = c.axis
        for x in axes:
            if x <= pos:
                pos += 1
        a.set(node.output[0], Chan(pos, c.ids))


_REDUCE = (
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
    "ReduceSumSquare ArgMax ArgMin"
).split()


@handles_channels(*_REDUCE)
def _reduce(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(attr(node, "axis", 0))]
    elif len(node.input) > 1 and node.input[1]:
        v = a.const(node.input[1])
        if v is None:
            a.freeze(c.ids, f"{q(node)} reduces over axes computed at run time")
            return
        axes = [int(x) for x in v]
    else:
        axes = attr(node, "axes")
        axes = list(range(r)) if axes is None else [int(x) for x in axes]
    if not axes and not attr(node, "noop_with_empty_axes", 0):
        axes = list(range(r))
    axes = [x % r for x in axes]
    if c.axis in axes:
        a.freeze(c.ids, f"{q(node)} reduces over the channels")
        return
    keep = int(attr(node, "keepdims", 1))
    pos = c.axis if keep else c.axis - sum(1 for x in axes if x < c.axis)
    a.set(node.output[0], Chan(pos, c.ids))


@handles_channels("Resize", "Upsample")
def _resize(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    scales_name = node.input[2] if len(node.input) > 2 else (node.input[1] if node.op_type == "Upsample" else "")
    scales = a.const(scales_name) if scales_name else None
    if scales is not None and scales.size > c.axis and scales.size > 1 and float(scales[c.axis]) != 1.0:
        a.freeze(c.ids, f"{q(node)} resizes the channel axis")
        return
    sizes_name = node.input[3] if len(node.input) > 3 else ""
    if sizes_name:
        if a.const(sizes_name) is None:
            a.freeze(c.ids, f"{q(node)} resizes to sizes computed at run time")
            a.opaque(node.output[0], node.name, f"resized by {q(node)}")
            return
        r = a.rank(node.input[0]) or 4
        axes = attr(node, "axes")  # opset 18: sizes may list only some axes
        axes = list(range(r)) if axes is None else [int(x) % r for x in axes]
        if c.axis in axes:
            a.fixes.append(ShapeEntryFix(node.name, 3, axes.index(c.axis), c.ids, 1))
    a.set(node.output[0], c)


@handles_channels("Expand")
def _expand(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    r_in, out = a.rank(node.input[0]), a.model.shape(node.output[0])
    if r_in is None or out is None:
        a.freeze(c.ids, f"{q(node)} expands to an unknown shape")
        return
    pos = len(out) - r_in + c.axis
    if out[pos] != len(c):
        a.freeze(c.ids, f"{q(node)} broadcasts the channel axis")
        return
    target = a.const(node.input[1])
    if target is not None and len(target) > pos - (len(out) - len(target)) >= 0:
        k = pos - (len(out) - len(target))
        if int(target[k]) == len(c) and len(c) > 1:
            a.fixes.append(ShapeEntryFix(node.name, 1, k, c.ids, 1))
    a.set(node.output[0], Chan(pos, c.ids))


@handles_channels("Tile")
def _tile(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    reps = a.const(node.input[1])
    if reps is None or int(reps[c.axis]) != 1:
        a.freeze(c.ids, f"{q(node)} repeats the channel axis")
        a.opaque(node.output[0], node.name, f"tiled by {q(node)}")
        return
    a.set(node.output[0], c)


@handles_channels("Shape", "Size")
def _shape(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    """Reading a tensor's shape is harmless unless the channel count is used; then freeze."""
    if node.op_type == "Size":
        a.freeze(c.ids, f"its element count is read by {q(node)}")
        return
    r = a.rank(node.input[0])
    start = int(attr(node, "start", 0)) % (r + 1) if r else 0
    end = attr(node, "end")
    end = r if end is None else int(end) % (r + 1) if int(end) < 0 else min(int(end), r)
    if not (start <= c.axis < end):
        return
    pos = c.axis - start
    for user in a.model.consumers.get(node.output[0], []):
        if user.op_type == "Gather":
            idx = a.const(user.input[1])
            if idx is not None and pos not in [int(v) % (end - start) for v in np.ravel(idx)]:
                continue
        elif user.op_type == "Slice":
            st, en = a.const(user.input[1]), a.const(user.input[2])
            if st is not None and en is not None and pos not in range(end - start)[slice(int(st[0]), int(en[0]))]:
                continue
        a.freeze(c.ids, f"the channel count is read at run time by {q(user)} (via {q(node)})")
        return
