"""Apply a pruning plan to the ONNX graph: physically remove channels.

Given the units a :class:`~carve.pipeline.graph.plan.Plan` removes, every constant recorded by the channel analysis is
cut along its axis (filters, consumer columns, biases, BN statistics, per-channel constants, concatenated constants),
every recorded fix (:mod:`carve.pipeline.graph.channels.fixes`: Split sizes, Slice bounds, Pad pads, depthwise
``group``, Gather indices, Reshape targets, Resize sizes) is applied, shapes are inferred again, and the result is
checked: graph output shapes never change and the model passes ``onnx.checker`` with full (strict shape inference)
checking. The model's ``metadata_props`` record what was done (:mod:`carve.pipeline.graph.history`).

:func:`zero_removed` builds the reference that defines correctness: the original model in which every consumer weight
of a removed channel is zeroed. The pruned model computes exactly the same function.
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
    Fix,
    GatherFix,
    GroupFix,
    PadFix,
    ReshapeFix,
    ShapeEntryFix,
    SliceFix,
    SplitFix,
)
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
    for name, chan in analysis.tensors.items():
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
    sizes = [int(keep(s).sum()) for s in fix.segments]
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


@_applies(ReshapeFix)
def _reshape(model: Model, fix: ReshapeFix, keep: Keep) -> None:
    node = model.nodes[fix.node]
    shape = model.array(node.input[1]).copy()
    if fix.pos < len(shape) and int(shape[fix.pos]) > 0:
        shape[fix.pos] = int(keep(fix.ids).sum()) * fix.inner
        _set_input_const(model, node, 1, shape)


@_applies(ShapeEntryFix)
def _shape_entry(model: Model, fix: ShapeEntryFix, keep: Keep) -> None:
    node = model.nodes[fix.node]
    arr = model.array(node.input[fix.input_idx]).copy()
    arr[fix.pos] = int(keep(fix.ids).sum()) * fix.inner
    _set_input_const(model, node, fix.input_idx, arr)
