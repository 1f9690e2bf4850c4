"""Apply a pruning plan to the ONNX graph: physically remove channels.

Given the units a :class:`~carve.pipeline.graph.plan.Plan` removes, every constant recorded by the channel analysis is
cut along its axis (filters, consumer columns, biases, BN statistics, per-channel constants, concatenated constants),
every recorded fix (:mod:`carve.pipeline.graph.channels.fixes`: Split sizes, Slice bounds, Pad pads, depthwise
``group``, Gather indices, Reshape targets, Resize sizes) is applied, shapes are inferred again, and the result is
checked: graph output shapes never change and the model passes ``onnx.checker`` with full (strict shape inference)
checking. The model's ``metadata_props`` record what was done (:mod:`carve.pipeline.graph.history`).

:func:`reference` builds the reference that defines correctness: the original model in which every consumer weight
of a removed channel is zeroed (:func:`zero_removed`, which keeps the graph as it is: repairs edit that copy), channels
contracted between two activations (a head's Q/K pair) are masked where they meet, and statistics over channels
(LayerNorm) are computed over the kept channels only. The pruned model computes exactly the same function. A removal
that changes a statistic is *inexact*: :func:`reference` with ``statistics="all"`` keeps the statistics over every
channel, and the pruned model's distance to that is the error the removal itself introduces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis, fingerprint
from carve.pipeline.graph.channels.fixes import (
    BlockSliceFix,
    Factors,
    Fix,
    GatherFix,
    GroupFix,
    PadFix,
    ReshapeFix,
    ShapeEntryFix,
    SlabGatherFix,
    SliceFix,
    SplitFix,
)
from carve.pipeline.graph.channels.layout import regular_shape
from carve.pipeline.graph.cost import Cost, model_cost
from carve.pipeline.graph.history import record
from carve.pipeline.graph.model import Model, attr
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.shapes import verify_structure

Keep = Callable[[np.ndarray], np.ndarray]


def _keep_fn(analysis: ChannelAnalysis, removed_units: np.ndarray) -> Keep:
    removed = np.asarray(removed_units, dtype=bool)

    def keep(ids: np.ndarray) -> np.ndarray:
        return ~removed[analysis.unit_of[ids]]

    return keep


def _check_plan(model: Model, plan: Plan) -> ChannelAnalysis:
    analysis = plan.analysis
    if analysis.fingerprint != fingerprint(model):
        raise CarveError(
            "the plan was made for a different model (or the model changed since it was analysed)",
            hint="analyse the model you prune: plan(analyse(model), ...)",
        )
    if plan.removed.shape != (analysis.n_units,):
        raise CarveError("the plan does not match the analysis it refers to")
    bad = plan.removed & analysis.unit_frozen
    if bad.any():
        u = int(np.flatnonzero(bad)[0])
        raise CarveError(f"the plan removes frozen channel unit {u}: {'; '.join(analysis.frozen_reasons(u))}")
    keep = _keep_fn(analysis, plan.removed)
    for name, chan in [*analysis.tensors.items(), *analysis.blocks.items()]:
        if len(chan) and not keep(chan.ids).any():
            raise CarveError(
                f"the plan removes every channel of tensor {name!r}", hint="keep at least one (`keep_min`)"
            )
    return analysis


@dataclass
class Cut:
    """What surgery did: the pruned model, the output channels (and channel units, and groups) removed, and the
    model's cost before and after."""

    model: Model
    channels_before: int
    channels_removed: int
    units_removed: int
    groups_touched: int
    before: Cost
    after: Cost


def cut(model: Model, plan: Plan, *, verify: bool = True, inplace: bool = False) -> Cut:
    """Physically remove the plan's channels; the typed report of the result. Records nothing in the model's history
    (the caller that owns the result does, once: :func:`prune`, or the prune operation of
    :mod:`carve.pipeline.pruning.prune`).

    ``model`` is left untouched unless ``inplace`` (which saves a copy of every weight: the CLI uses it).
    """
    analysis = _check_plan(model, plan)
    shapes_before = {n: model.shape(n) for n in model.output_names}
    before = model_cost(model)
    out = model if inplace else model.copy()
    keep = _keep_fn(analysis, plan.removed)
    cut_constants(out, analysis, keep)
    for fix in analysis.fixes:
        apply_fix(out, fix, keep)
    del out.graph.value_info[:]
    out.refresh()
    if verify:
        verify_structure(shapes_before, out, what="pruning")
    counts = plan.counts()
    return Cut(
        out,
        counts["channels_before"],
        counts["channels_removed"],
        counts["units_removed"],
        counts["groups_touched"],
        before,
        model_cost(out),
    )


def prune(model: Model, plan: Plan, *, verify: bool = True, command: str | None = None, inplace: bool = False) -> Model:
    """Return a model with the plan's channels physically removed, the plan recorded in its history.

    ``model`` is left untouched unless ``inplace`` (which saves a copy of every weight).
    """
    done = cut(model, plan, verify=verify, inplace=inplace)
    record(done.model, "prune", plan.summary(cost_before=done.before, cost_after=done.after), command=command)
    return done.model


def cut_constants(model: Model, analysis: ChannelAnalysis, keep: Keep) -> None:
    """Cut every recorded constant along its axes (each distinct (tensor, axis) once)."""
    per_tensor: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for rec in analysis.slice_records:
        per_tensor[rec.tensor].setdefault(rec.axis, rec.ids)
    for tensor, axes in per_tensor.items():
        arr = model.array(tensor)
        changed = False
        for axis, ids in axes.items():
            k = keep(ids)
            if not k.all():
                arr = np.compress(k, arr, axis=axis)
                changed = True
        if changed:
            model.set_array(tensor, arr)


def zero_removed(model: Model, plan: Plan) -> Model:
    """The original model with every consumer column of a removed channel set to zero (the pruning's reference)."""
    analysis = _check_plan(model, plan)
    out = model.copy()
    keep = _keep_fn(analysis, plan.removed)
    for rec in analysis.slice_records:
        if rec.role != "in":
            continue
        k = keep(rec.ids)
        if k.all():
            continue
        arr = np.array(out.array(rec.tensor))
        index = [slice(None)] * arr.ndim
        index[rec.axis] = ~k
        arr[tuple(index)] = 0
        out.set_array(rec.tensor, arr)
    return out


def reference(model: Model, plan: Plan, *, statistics: str = "kept", neutral: bool = False) -> Model:
    """The model the pruned one must equal: :func:`zero_removed`, plus a mask on every activation product that
    contracts removed channels, plus (``statistics="kept"``) every LayerNorm statistic over the kept channels only
    (``"all"``: statistics over every channel, as the original computes them: the plain reference of an inexact
    removal). Extra nodes are inserted, so the result is for running, not for pruning. ``neutral``: the same graph,
    nothing zeroed and every mask 1 (the original's function in the reference's structure: what repairs compare
    against node by node)."""
    if statistics not in ("kept", "all"):
        raise ValueError(f"statistics must be 'kept' or 'all', got {statistics!r}")
    analysis = _check_plan(model, plan)
    out = model.copy() if neutral else zero_removed(model, plan)
    removed = _keep_fn(analysis, plan.removed)
    keep = (lambda ids: np.ones(np.shape(ids), dtype=bool)) if neutral else removed
    before: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    replace: dict[str, list[onnx.NodeProto]] = {}
    ed = _Editor(out)
    for rec in analysis.contract_records:
        if removed(rec.ids).all():
            continue
        kept = keep(rec.ids)
        node = out.nodes[rec.node]
        name = node.input[rec.input_idx]
        mask = _placed(kept, rec.axes, len(out.shape(name) or ()), ed.np_dtype(name))
        before[node.name].append(ed.node("Mul", [name, ed.const(f"{node.name}_mask{rec.input_idx}", mask)]))
        node.input[rec.input_idx] = before[node.name][-1].output[0]
    if statistics == "kept":
        for rec in analysis.stat_records:
            if removed(rec.ids).all():
                continue
            kept = keep(rec.ids)
            node = out.nodes[rec.node]
            rank = len(out.shape(rec.input) or ())
            mask = _placed(kept, (rec.axis,), rank, ed.np_dtype(rec.input))
            factor = np.array(len(kept) / max(int(kept.sum()), 1), dtype=mask.dtype)
            if rec.kind == "mean":
                m = ed.node("Mul", [node.input[0], ed.const(f"{node.name}_mask", mask)])
                before[node.name].append(m)
                node.input[0] = m.output[0]
                y = node.output[0]
                node.output[0] = ed.fresh(f"{node.name}_unscaled")
                replace[node.name] = [node, ed.node("Mul", [node.output[0], ed.const(f"{node.name}_f", factor)], [y])]
            else:
                replace[node.name] = _masked_layer_norm(out, ed, node, rank, mask, factor)
    nodes = []
    for n in out.graph.node:
        nodes += before.get(n.name, [])
        nodes += replace.get(n.name, [n])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.refresh(shapes=False)
    out.shapes = model.shapes
    return out


def _placed(values: np.ndarray, axes: tuple[int, ...], rank: int, dtype) -> np.ndarray:
    """``values`` (one dim per axis in ``axes``) as an array of rank ``rank`` that broadcasts along the other axes."""
    shape = [1] * rank
    for k, ax in enumerate(axes):
        shape[ax] = values.shape[k]
    return np.asarray(values, dtype=dtype).reshape(shape)


def _masked_layer_norm(model: Model, ed: _Editor, node: onnx.NodeProto, rank: int, mask, factor) -> list:
    """LayerNormalization over the kept channels only (``mask``), spelled out: mean and variance of the masked input
    scaled by all/kept."""
    x, scale = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    first = int(attr(node, "axis", -1)) % rank
    axes = list(range(first, rank))
    eps = np.array(float(attr(node, "epsilon", 1e-5)), dtype=mask.dtype)
    m, f = ed.const(f"{node.name}_mask", mask), ed.const(f"{node.name}_f", factor)
    nodes = []

    def add(op, ins, outs=None):
        nodes.append(ed.node(op, ins, outs))
        return nodes[-1].output[0]

    mean = add("Mul", [ed.reduce_mean(nodes, add("Mul", [x, m]), axes), f])
    d = add("Sub", [x, mean])
    dm = add("Mul", [d, m])
    var = add("Mul", [ed.reduce_mean(nodes, add("Mul", [dm, dm]), axes), f])
    std = add("Sqrt", [add("Add", [var, ed.const(f"{node.name}_eps", eps)])])
    y = add("Mul", [add("Div", [d, std]), scale], None if bias else [node.output[0]])
    if bias:
        add("Add", [y, bias], [node.output[0]])
    return nodes


class _Editor:
    """Fresh names, constants and nodes for :func:`reference`."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.n = 0

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"carve_ref/{base}/{self.n}"

    def const(self, base: str, arr: np.ndarray) -> str:
        return self.model.add_initializer(self.fresh(base), np.asarray(arr))

    def node(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> onnx.NodeProto:
        name = self.fresh(op)
        return onnx.helper.make_node(op, inputs, outputs or [f"{name}:0"], name=name, **attrs)

    def np_dtype(self, tensor: str):
        t = self.model.dtype(tensor)
        return onnx.helper.tensor_dtype_to_np_dtype(t) if t else np.float32

    def reduce_mean(self, nodes: list, x: str, axes: list[int]) -> str:
        if self.model.opset >= 18:
            n = self.node("ReduceMean", [x, self.const("axes", np.array(axes, dtype=np.int64))], keepdims=1)
        else:
            n = self.node("ReduceMean", [x], axes=axes, keepdims=1)
        nodes.append(n)
        return n.output[0]


# ---------------------------------------------------------------------------------------------------------------------
# fixes: one applier per record type

_APPLIERS: dict[type[Fix], Callable[[Model, Fix, Keep], None]] = {}


def _applies(kind: type[Fix]):
    def deco(fn):
        _APPLIERS[kind] = fn
        return fn

    return deco


def apply_fix(model: Model, fix: Fix, keep: Keep) -> None:
    _APPLIERS[type(fix)](model, fix, keep)


def _set_input_const(model: Model, node: onnx.NodeProto, idx: int, arr: np.ndarray) -> None:
    """Give ``node`` input ``idx`` a new constant value without touching other readers of the old one."""
    name = node.input[idx]
    if name in model.init and len(model.consumers.get(name, [])) == 1:
        model.set_array(name, arr)
    else:
        node.input[idx] = model.add_initializer(f"{node.name}_{idx}", arr)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, at in enumerate(node.attribute):
        if at.name == name:
            del node.attribute[k]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


@_applies(GroupFix)
def _group(model: Model, fix: GroupFix, keep: Keep) -> None:
    _set_attr(model.nodes[fix.node], "group", int(keep(fix.ids).sum()))


@_applies(SplitFix)
def _split(model: Model, fix: SplitFix, keep: Keep) -> None:
    if fix.axis is None:
        sizes = [int(keep(s).sum()) for s in fix.segments]
    else:
        sizes = [regular_shape(keep(s))[fix.axis] for s in fix.segments]
    node = model.nodes[fix.node]
    if len(node.input) > 1 and node.input[1]:
        _set_input_const(model, node, 1, np.array(sizes, dtype=np.int64))
    elif model.opset >= 13:
        # opset 13+ takes sizes as an input; opset 18's num_outputs (equal chunks) may no longer hold
        for k, at in enumerate(node.attribute):
            if at.name == "num_outputs":
                del node.attribute[k]
                break
        while len(node.input) < 2:
            node.input.append("")
        node.input[1] = model.add_initializer(f"{node.name}_split", np.array(sizes, dtype=np.int64))
    else:
        _set_attr(node, "split", sizes)


@_applies(SliceFix)
def _slice(model: Model, fix: SliceFix, keep: Keep) -> None:
    kept = keep(fix.ids)
    new_start = int(kept[: fix.start].sum())
    new_end = new_start + int(kept[fix.start : fix.end].sum())
    node = model.nodes[fix.node]
    for idx, value in ((1, new_start), (2, new_end)):
        arr = model.array(node.input[idx]).copy()
        arr[fix.k] = value
        _set_input_const(model, node, idx, arr)


@_applies(BlockSliceFix)
def _block_slice(model: Model, fix: BlockSliceFix, keep: Keep) -> None:
    start = regular_shape(keep(fix.before))[fix.axis] if fix.before.size else 0
    end = start + regular_shape(keep(fix.part))[fix.axis]
    node = model.nodes[fix.node]
    for idx, value in ((1, start), (2, end)):
        arr = model.array(node.input[idx]).copy()
        if int(arr[fix.k]) != value:
            arr[fix.k] = value
            _set_input_const(model, node, idx, arr)


@_applies(PadFix)
def _pad(model: Model, fix: PadFix, keep: Keep) -> None:
    node = model.nodes[fix.node]
    b, e = int(keep(fix.before).sum()), int(keep(fix.after).sum())
    if len(node.input) > 1 and node.input[1]:
        pads = model.array(node.input[1]).copy()
        pads[fix.k], pads[fix.k + fix.n_axes] = b, e
        _set_input_const(model, node, 1, pads)
    else:
        pads = list(attr(node, "pads"))
        pads[fix.k], pads[fix.k + fix.n_axes] = b, e
        _set_attr(node, "pads", pads)


@_applies(GatherFix)
def _gather(model: Model, fix: GatherFix, keep: Keep) -> None:
    kept = keep(fix.ids)
    new_pos = np.cumsum(kept) - 1
    sel = fix.idx[kept[fix.idx]]
    node = model.nodes[fix.node]
    _set_input_const(model, node, 1, new_pos[sel].astype(model.array(node.input[1]).dtype))


def _factor_to_change(f: Factors, size: int) -> tuple[tuple[str, int, int], int]:
    """Which constant of ``batch x c1 x c2 ...`` to change, and to what, for the product to become ``size``."""
    for node, idx, pos, value in f.factors:
        if (size * value) % f.scale == 0:
            return (node, idx, pos), size * value // f.scale
    raise AssertionError(f"no factor of {f.scale} can make {size}")


@_applies(SlabGatherFix)
def _slab_gather(model: Model, fix: SlabGatherFix, keep: Keep) -> None:
    mask = keep(fix.label)
    others = tuple(k for k in range(mask.ndim) if k != fix.axis)
    slabs = mask.any(axis=others) if others else mask
    new = int(slabs[: fix.index].sum())
    if new != fix.index:
        node = model.nodes[fix.node]
        _set_input_const(model, node, 1, np.array(new, dtype=model.array(node.input[1]).dtype))


@_applies(ReshapeFix)
def _reshape(model: Model, fix: ReshapeFix, keep: Keep) -> None:
    new = regular_shape(keep(fix.label))
    for where, value in zip(fix.entries, new):
        if where is None:
            continue
        if isinstance(where, Factors):
            where, value = _factor_to_change(where, value)
        node_name, idx, k = where
        node = model.nodes[node_name]
        arr = model.array(node.input[idx])
        if int(np.ravel(arr)[k]) == value:
            continue
        arr = arr.copy()
        arr.reshape(-1)[k] = value
        _set_input_const(model, node, idx, arr)


@_applies(ShapeEntryFix)
def _shape_entry(model: Model, fix: ShapeEntryFix, keep: Keep) -> None:
    node = model.nodes[fix.node]
    arr = model.array(node.input[fix.input_idx]).copy()
    arr[fix.pos] = int(keep(fix.ids).sum()) * fix.inner
    _set_input_const(model, node, fix.input_idx, arr)
