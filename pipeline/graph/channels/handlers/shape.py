"""Handlers of shape-changing ops: Flatten and Reshape (channels merged with the dims after them, as Flatten -> Gemm
does), Transpose, Squeeze/Unsqueeze, reductions, Resize, Expand, Tile, and Shape/Size (harmless unless the channel
count is read at run time)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Block, Chan, Layout, folded_axis, layout, parts, with_fold
from carve.pipeline.graph.channels.fixes import Factors, ReshapeFix, ShapeEntryFix
from carve.pipeline.graph.channels.handlers.table import handles_channels, q
from carve.pipeline.graph.channels.layout import relabel
from carve.pipeline.graph.channels.state import Analyser
from carve.pipeline.graph.model import Model, attr


@handles_channels("Flatten", blocks=True)
def _flatten(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    shp = a.model.shape(node.input[0])
    if shp is None:
        a.freeze(c.ids, f"{q(node)} flattens a tensor of unknown rank")
        return
    axis = int(attr(node, "axis", 1)) % (len(shp) + 1)
    if max(c.axes) < axis and isinstance(c, Chan):
        a.set(node.output[0], c)  # channels stay on the outer (first) axis
        return
    outer, inner = shp[:axis], shp[axis:]
    outs = (_product(outer), _product(inner))
    res = relabel(c, shp, outs)
    if isinstance(res, str):
        a.freeze(c.ids, f"{q(node)} {res}")
        a.opaque(node.output[0], node.name, f"flattened by {q(node)}")
        return
    a.set(node.output[0], res[0])


def _product(dims) -> int | None:
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype=np.int64))


@handles_channels("Reshape", blocks=True)
def _reshape(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    """Followed through any regrouping of dims (:mod:`carve.pipeline.graph.channels.layout`): the channel axis kept
    with the dims around it regrouped (window partition, patch flatten), merged with neighbouring dims (Flatten-like),
    split into several axes (attention heads: a block) or a block merged back. The target's entries at the channel
    dims must be constants (or -1, or read at run time from a tensor pruned alike), so surgery can fix them."""
    ins, outs = a.model.shape(node.input[0]), a.model.shape(node.output[0])
    entries = shape_refs(a.model, node.input[1], node)
    if outs is None or (entries is not None and len(outs) != len(entries)):
        outs = _target_dims(ins, entries)
    folded = folded_axis(c) is not None
    res = "the channels are folded into the batch" if folded else relabel(c, ins, outs)
    if isinstance(res, str) and entries is not None and (folded or _batch_involved(ins, outs)):
        res = _relabel_batched(a, c, ins, entries) or res
    if isinstance(res, str):
        a.freeze(c.ids, f"{q(node)} {res}")
        a.opaque(node.output[0], node.name, f"reshaped by {q(node)}")
        return
    new, positions, label = res
    if entries is None:
        a.freeze(c.ids, f"{q(node)} reshapes to a shape carve cannot see")
        a.opaque(node.output[0], node.name, f"reshaped by {q(node)}")
        return
    fix: list[tuple[str, int, int] | Factors | None] = []
    for pos in positions:
        e = entries[pos]
        if pos not in new.axes:
            fix.append(None)  # the labels do not vary along it: its size never changes
            continue
        if e.value is not None and e.value > 0 and e.where is not None:
            fix.append(e.where)
            continue
        if e.dim is not None and e.factors and folded_axis(new) == pos:
            fix.append(Factors(e.scale, e.factors))
            continue
        if e.value == -1:
            fix.append(None)
            continue
        same = _same_channels_at(a, e, pos, new, node)
        if same and e.dim is not None:
            a.dim_reads_ok.add((node.name, *e.dim))
        if same is None:
            why = "copies" if e.value == 0 else "reads" if e.dim is not None else "computes"
            a.freeze(
                c.ids,
                f"{q(node)} {why} its channel dimension {'at run time ' if why != 'copies' else ''}from "
                f"a tensor carve cannot match with its channels",
            )
            a.opaque(node.output[0], node.name, f"reshaped by {q(node)}")
            return
        fix.append(None)
    a.fixes.append(ReshapeFix(node.name, positions, fix, label))
    a.set(node.output[0], new)


def _batch_involved(ins, outs) -> bool:
    return ins is not None and outs is not None and (None in ins or None in outs)


def _relabel_batched(a: Analyser, c: Layout, ins, entries):
    """Follow a Reshape that regroups the batch (the one dim of unknown size) with the channels: MobileViT's unfold
    ``x.reshape(B * C * n_h, p_h, n_w, p_w)`` and its inverse, the heads of ``nn.MultiheadAttention`` folded into its
    batch axis (``[T, B, H*D] -> [T, B*H, D]``). The target is evaluated at batch 1 and 2: when exactly one output axis
    scales with the batch, and the dims before the batch multiply to the same on both sides, every batch is laid out
    as batch 1 is (the batch is the outermost factor of that axis). A channel axis that lands there is *folded*. None
    when this does not apply."""
    if ins is None or sum(d is None for d in ins) != 1:
        return None
    p = list(ins).index(None)
    fold = folded_axis(c)
    if fold is not None and fold != p:
        return None
    axes, ids = parts(c)
    extent = ids.shape[axes.index(p)] if fold is not None else 1
    if fold is None and p in axes:
        return None
    dims = []
    for b in (1, 2):
        ins_b = [b * extent if k == p else int(d) for k, d in enumerate(ins)]
        out = _entries_at(a, entries, ins_b, b)
        if out is None:
            return None
        dims.append((ins_b, out))
    (i1, o1), (_, o2) = dims
    grown = [k for k in range(len(o1)) if o2[k] != o1[k]]
    if len(grown) != 1 or o2[grown[0]] != 2 * o1[grown[0]]:
        return None
    qx = grown[0]
    if int(np.prod(i1[:p], dtype=np.int64)) != int(np.prod(o1[:qx], dtype=np.int64)):
        return None  # the batch does not sit at the same place of the row-major order on both sides
    res = relabel(with_fold(c, None), i1, o1)
    if isinstance(res, str):
        return None
    new, positions, label = res
    return with_fold(new, qx if qx in new.axes else None), positions, label


def _entries_at(a: Analyser, entries, ins: list[int], b: int) -> list[int] | None:
    """The target dims at batch ``b`` (``ins``: the input's dims at that batch), or None."""
    dims: list[int | None] = []
    for k, e in enumerate(entries):
        if e.value is not None and e.value > 0:
            dims.append(e.value)
        elif e.value == 0:
            dims.append(ins[k] if k < len(ins) else None)
        elif e.value == -1:
            dims.append(None)
        elif e.dim is not None:
            shp = a.model.shape(e.dim[0])
            if shp is None or e.dim[1] >= len(shp):
                return None
            d = shp[e.dim[1]]
            if d is None and folded_axis(a.get(e.dim[0])) is not None:
                return None  # a dim of a tensor that holds channels and batch together
            dims.append((b if d is None else int(d)) * e.scale)
        else:
            return None
    total = int(np.prod(ins, dtype=np.int64))
    known = int(np.prod([d for d in dims if d is not None], dtype=np.int64))
    if dims.count(None) > 1 or known == 0 or total % known:
        return None
    if None in dims:
        dims[dims.index(None)] = total // known
    return dims if int(np.prod(dims, dtype=np.int64)) == total else None


def _same_channels_at(a: Analyser, e, pos: int, new: Layout, node: onnx.NodeProto) -> bool | None:
    """An entry copied (0) or read at run time from a dim of a tensor carrying exactly the channels output dim
    ``pos`` will carry: it follows the pruning by itself."""
    if e.value == 0:
        tensor, k = node.input[0], pos
    elif e.dim is not None:
        tensor, k = e.dim
    else:
        return None
    src = a.get(tensor)
    if src is None or k not in src.axes or pos not in new.axes:
        return None
    return True if _slabs(src, k) == _slabs(new, pos) else None


def _slabs(c: Layout, axis: int) -> list[frozenset[int]]:
    """The elements at each index of ``axis`` (a head's channels along a head axis; one channel along a vector)."""
    axes, ids = parts(c)
    k = axes.index(axis)
    return [frozenset(np.take(ids, i, axis=k).ravel().tolist()) for i in range(ids.shape[k])]


def _target_dims(ins, entries) -> list[int | None] | None:
    """Output dims of a Reshape from its target entries when shape inference could not give them."""
    if entries is None or ins is None:
        return None
    dims: list[int | None] = []
    for k, e in enumerate(entries):
        if e.value == 0:
            dims.append(ins[k] if k < len(ins) else None)
        elif e.value is not None and e.value > 0:
            dims.append(e.value)
        else:
            dims.append(None)
    if dims.count(None) == 1 and all(d is not None for d in ins):
        known = int(np.prod([d for d in dims if d is not None], dtype=np.int64))
        total = int(np.prod(ins, dtype=np.int64))
        if known and total % known == 0:
            dims[dims.index(None)] = total // known
    return dims


@dataclass(frozen=True)
class Entry:
    """One entry of a shape tensor: its value where constant, the dim it reads at run time (``(tensor, axis)``), and
    where the constant lives (``(node, input index, flat position)``) so that surgery can change it."""

    value: int | None = None
    dim: tuple[str, int] | None = None
    where: tuple[str, int, int] | None = None
    scale: int = 1  # a dim read at run time times constants: ``x.size(0) * C * n`` (channels folded into the batch)
    factors: tuple[tuple[str, int, int, int], ...] = ()


def shape_refs(model: Model, name: str, reader: onnx.NodeProto, input_idx: int = 1, depth: int = 8):
    """The entries of a 1-D shape tensor read by ``reader`` as input ``input_idx``: constants (with where they live),
    dims read at run time (``x.size(0)``, ``x.shape[:2]``), unknown; None when the tensor cannot be followed."""
    if model.is_const(name):
        v = model.array(name)
        if v.ndim > 1:
            return None
        return [Entry(int(x), None, (reader.name, input_idx, k)) for k, x in enumerate(np.ravel(v))]
    node = model.producer.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == "Concat":
        parts = [shape_refs(model, i, node, k, depth - 1) for k, i in enumerate(node.input)]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op_type == "Reshape" and model.is_const(node.input[1]) and model.array(node.input[1]).tolist() == [-1]:
        return shape_refs(model, node.input[0], node, 0, depth - 1)  # a 1-D shape stays itself
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze", "Reshape"):
        inner = shape_refs(model, node.input[0], node, 0, depth - 1)
        return inner if inner is not None and len(inner) <= 1 else None
    readers = {"Where": _where_refs, "Shape": _shape_op_refs, "Mul": _mul_refs, "Gather": _index_refs}
    reader = readers.get("Gather" if node.op_type == "Slice" else node.op_type)
    return reader(model, node, depth) if reader is not None else None


def _shape_op_refs(model: Model, node: onnx.NodeProto, depth: int):
    """``Shape(x)`` (with ``start``/``end``): the dims of ``x``, read at run time."""
    r = len(model.shape(node.input[0]) or ())
    start = int(attr(node, "start", 0)) % (r + 1) if r else 0
    end = attr(node, "end")
    end = r if end is None else (int(end) % (r + 1) if int(end) < 0 else min(int(end), r))
    return [Entry(None, (node.input[0], k)) for k in range(start, end)]


def _mul_refs(model: Model, node: onnx.NodeProto, depth: int):
    """A run-time dim times a positive scalar constant (``x.size(1) * 2``): one entry that records the factor."""
    if len(node.input) != 2:
        return None
    k = next((j for j in (0, 1) if model.is_const(node.input[j]) and model.array(node.input[j]).size == 1), None)
    if k is None:
        return None
    inner = shape_refs(model, node.input[1 - k], node, 1 - k, depth - 1)
    v = int(np.ravel(model.array(node.input[k]))[0])
    if inner is None or len(inner) != 1 or inner[0].dim is None or v <= 0:
        return None
    e = inner[0]
    return [Entry(None, e.dim, None, e.scale * v, (*e.factors, (node.name, k, 0, v)))]


def _index_refs(model: Model, node: onnx.NodeProto, depth: int):
    """``Gather`` or ``Slice`` with constant indices of a shape tensor: the entries picked."""
    src = shape_refs(model, node.input[0], node, 0, depth - 1)
    if src is None or any(not model.is_const(i) for i in node.input[1:] if i):
        return None
    if node.op_type == "Gather":
        idx = np.ravel(model.array(node.input[1]))
        return [src[int(k) % len(src)] for k in idx]
    starts, ends = (int(np.ravel(model.array(node.input[k]))[0]) for k in (1, 2))
    step = int(np.ravel(model.array(node.input[4]))[0]) if len(node.input) > 4 and node.input[4] else 1
    return src[slice(starts, ends, step)]


def _where_refs(model: Model, node: onnx.NodeProto, depth: int):
    """``Where(Equal(s, k), v, s)``: exporters write it to turn -1 into 1 in an Expand target (``x.expand(B, -1, -1)``).
    Entry by entry: the constant ``v`` where ``s`` holds ``k``, else ``s``."""
    cond = model.producer.get(node.input[0])
    if cond is None or cond.op_type != "Equal" or cond.input[0] != node.input[2]:
        return None
    if not (model.is_const(cond.input[1]) and model.is_const(node.input[1])):
        return None
    s = shape_refs(model, node.input[2], node, 2, depth - 1)
    k, v = np.ravel(model.array(cond.input[1])), np.ravel(model.array(node.input[1]))
    if s is None:
        return None
    k = np.broadcast_to(k, (len(s),))
    v = np.broadcast_to(v, (len(s),))
    out = []
    for j, e in enumerate(s):
        if e.value is not None and e.value == int(k[j]):
            out.append(Entry(int(v[j])))
        elif e.value is not None:
            out.append(e)  # passed through: editing the constant behind it edits this entry (a new count is not k)
        else:
            out.append(Entry(None, e.dim, None, e.scale, e.factors))
    return out


@handles_channels("Transpose", blocks=True)
def _transpose(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    perm = attr(node, "perm")
    perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
    axes, ids = parts(c)
    new_axes = [perm.index(x) for x in axes]
    fold = folded_axis(c)
    if isinstance(c, Block) and new_axes != sorted(new_axes):
        # heads stay outside their channels: regular_shape and the lockstep of head widths rely on that order
        a.freeze(c.ids, f"{q(node)} reorders the axes the channel axis was split into (a channel shuffle)")
        a.opaque(node.output[0], node.name, f"transposed by {q(node)}")
        return
    new = layout(new_axes, ids)
    a.set(node.output[0], new if fold is None else with_fold(new, perm.index(fold)))


@handles_channels("Squeeze", "Unsqueeze", blocks=True)
def _squeeze(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    r_in = a.rank(node.input[0])
    axes = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if axes is None and node.op_type == "Squeeze":
        shp = a.model.shape(node.input[0])
        if shp is None or any(d is None for d in shp):
            a.freeze(c.ids, f"{q(node)} squeezes unknown axes")
            return
        axes = [k for k, d in enumerate(shp) if d == 1]
    axes = [int(x) for x in np.ravel(axes)]
    c_axes, ids = parts(c)
    if node.op_type == "Squeeze":
        axes = [x % r_in for x in axes]
        for x in axes:
            if x in c_axes:
                k = c_axes.index(x)
                if ids.shape[k] != 1 or len(c_axes) == 1:
                    a.freeze(c.ids, f"{q(node)} removes the channel axis")
                    return
        keep = [k for k, x in enumerate(c_axes) if x not in axes]
        ids = ids.reshape([ids.shape[k] for k in keep])
        a.set(node.output[0], layout([c_axes[k] - sum(1 for x in axes if x < c_axes[k]) for k in keep], ids))
    else:
        r_out = r_in + len(axes)
        axes = sorted(x % r_out for x in axes)
        new = []
        for pos in c_axes:
            for x in axes:
                if x <= pos:
                    pos += 1
            new.append(pos)
        a.set(node.output[0], layout(new, ids))


_REDUCE = (
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
    "ReduceSumSquare ArgMax ArgMin"
).split()


@handles_channels(*_REDUCE)
def _reduce(a: Analyser, node: onnx.NodeProto, c: Chan, r: int | None) -> None:
    if r is None:
        a.freeze(c.ids, f"{q(node)} reduces a tensor of unknown rank")
        return
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
        if node.op_type == "ReduceMean" and int(attr(node, "keepdims", 1)) and _normalising(a, node, c):
            # a decomposed LayerNorm / RMSNorm: its mean or second moment over the channels (inexact, like LN's)
            a.stat(
                node,
                "mean",
                c,
                f"{q(node)} (a decomposed LayerNorm) averages over them: removing channels "
                "changes the statistic (not an exact removal)",
            )
            return
        a.freeze(c.ids, f"{q(node)} reduces over the channels")
        return
    keep = int(attr(node, "keepdims", 1))
    pos = c.axis if keep else c.axis - sum(1 for x in axes if x < c.axis)
    a.set(node.output[0], Chan(pos, c.ids))


def _normalising(a: Analyser, node: onnx.NodeProto, c: Chan) -> bool:
    """Is this ReduceMean over the channels a normalisation statistic: the mean subtracted from its own input
    (``x - mean(x)``), or the second moment of a tracked tensor (``mean(d*d)``, ``mean(d**2)``: variance, RMS)?"""
    x, out = node.input[0], node.output[0]
    if any(u.op_type == "Sub" and list(u.input[:2]) == [x, out] for u in a.model.consumers.get(out, [])):
        return True
    src = a.model.producer.get(x)
    if src is None:
        return False
    if (
        src.op_type == "Mul"
        and src.input[0] == src.input[1]
        or src.op_type == "Pow"
        and a.const(src.input[1]) is not None
        and np.all(a.const(src.input[1]) == 2)
    ):
        d = a.get(src.input[0])
    else:
        return False
    return isinstance(d, Chan) and d.axis == c.axis and np.array_equal(d.ids, c.ids)


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


@handles_channels("Shape", "Size", blocks=True)
def _shape(a: Analyser, node: onnx.NodeProto, c: Layout, r: int | None) -> None:
    """Reading a tensor's shape is harmless unless the channel count is used; then freeze."""
    if node.op_type == "Size":
        a.freeze(c.ids, f"its element count is read by {q(node)}")
        return
    r = a.rank(node.input[0])
    start = int(attr(node, "start", 0)) % (r + 1) if r else 0
    end = attr(node, "end")
    end = r if end is None else int(end) % (r + 1) if int(end) < 0 else min(int(end), r)
    for axis in c.axes:
        if start <= axis < end and _reads_dim(a, node, c, axis, axis - start, end - start):
            return


def _reads_dim(a: Analyser, node: onnx.NodeProto, c: Layout, axis: int, pos: int, n: int) -> bool:
    """Freeze ``c`` (and say so) if entry ``pos`` of the shape is used other than as the target dim of a Reshape
    that carries the same channels there."""
    for user in a.model.consumers.get(node.output[0], []):
        if user.op_type == "Gather":
            idx = a.const(user.input[1])
            if idx is not None and pos not in [int(v) % n for v in np.ravel(idx)]:
                continue
        elif user.op_type == "Slice":
            st, en = a.const(user.input[1]), a.const(user.input[2])
            if st is not None and en is not None and pos not in range(n)[slice(int(st[0]), int(en[0]))]:
                continue
        reason = f"the channel count is read at run time by {q(user)} (via {q(node)})"
        reshapes = _reshape_targets(a.model, user.output[0]) if user.op_type in ("Gather", "Slice") else None
        if reshapes:
            # fine if each of these Reshapes puts the dim where the same channels land (checked there; else frozen
            # when the walk ends)
            a.dim_reads.append((node.input[0], axis, c.ids, reason, frozenset(reshapes)))
            continue
        a.freeze(c.ids, reason)
        return True
    return False


def _reshape_targets(model: Model, name: str, depth: int = 6) -> set[str] | None:
    """The Reshapes ``name`` (a piece of a shape) reaches as their target, through Concat/Unsqueeze/Cast/Squeeze;
    None when it reaches anything else."""
    users = model.consumers.get(name, [])
    if not users or depth == 0 or name in model.output_names:
        return None
    out: set[str] = set()
    for u in users:
        if u.op_type == "Reshape" and u.input[1] == name and u.input[0] != name:
            out.add(u.name)
            continue
        if u.op_type in ("Concat", "Unsqueeze", "Cast", "Squeeze", "Identity"):
            more = _reshape_targets(model, u.output[0], depth - 1)
            if more is not None:
                out |= more
                continue
        return None
    return out
