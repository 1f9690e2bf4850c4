"""Apply a pruning plan to the ONNX graph: physically remove channels.

Given the units a :class:`~pipeline.planning.Plan` removes, every constant recorded by the channel analysis is cut along
its axis (filters, consumer columns, biases, BN statistics, per-channel constants, concatenated constants), every
recorded attribute or shape constant is recomputed (Split sizes, Slice bounds, Pad pads, depthwise ``group``, Reshape
targets, Resize sizes), shapes are inferred again, and the result is checked: graph output shapes never change and
the model passes ``onnx.checker`` with full (strict shape inference) checking. The model's ``metadata_props`` record
what was done so a deployed file explains itself.

:func:`zero_removed` builds the reference that defines correctness: the original model in which every consumer weight
of a removed channel is zeroed. The pruned model computes exactly the same function.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np

from . import __version__
from .channels import ChannelAnalysis, fingerprint
from .errors import CarveError
from .graph import Model, check
from .planning import Plan


def _keep_fn(analysis: ChannelAnalysis, removed_units: np.ndarray):
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
                f"the plan removes every channel of tensor {name!r}", hint="keep at least one (--keep-min)"
            )
    return analysis


def prune(model: Model, plan: Plan, *, verify: bool = True, command: str | None = None, inplace: bool = False) -> Model:
    """Return a model with the plan's channels physically removed.

    ``model`` is left untouched unless ``inplace`` (which saves a copy of every weight: the CLI uses it).
    """
    analysis = _check_plan(model, plan)
    before = {"shapes": {n: model.shape(n) for n in model.output_names}, "cost": None}
    from .cost import model_cost

    before["cost"] = model_cost(model)
    out = model if inplace else model.copy()
    keep = _keep_fn(analysis, plan.removed)
    cut_constants(out, analysis, keep)
    for fix in analysis.fixes:
        fix.apply(out, keep)
    del out.graph.value_info[:]
    out.refresh()
    if verify:
        verify_structure(before["shapes"], out)
    record(out, "prune", plan.summary(cost_before=before["cost"], model_after=out), command=command)
    return out


def cut_constants(model: Model, analysis: ChannelAnalysis, keep) -> None:
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


def verify_structure(output_shapes: dict, after: Model) -> None:
    """Graph outputs keep their shapes and the model passes the full ONNX checker."""
    for name, s0 in output_shapes.items():
        s1 = after.shape(name)
        if s0 is not None and s1 is not None and s0 != s1:
            raise AssertionError(f"pruning changed the shape of graph output {name!r}: {s0} -> {s1}")
    check(after.proto, full=True)


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


def record(model: Model, step: str, summary: dict, *, command: str | None = None, replace_last: bool = False) -> None:
    """Append a step to the model's ``carve.history`` metadata and refresh ``carve.version`` / ``carve.<step>``.

    ``replace_last`` overwrites the last history entry (a step that completes its own summary)."""
    props = {p.key: p for p in model.proto.metadata_props}
    history = json.loads(props["carve.history"].value) if "carve.history" in props else []
    if replace_last and history and history[-1]["step"] == step:
        history.pop()
    entry = {
        "step": step,
        "carve": __version__,
        "command": command or "python API",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary,
    }
    history.append(entry)
    values = {"carve.version": __version__, "carve.history": json.dumps(history), f"carve.{step}": json.dumps(summary)}
    if command:
        values["carve.command"] = command
    for key, value in values.items():
        if key in props:
            props[key].value = value
        else:
            p = model.proto.metadata_props.add()
            p.key, p.value = key, value
