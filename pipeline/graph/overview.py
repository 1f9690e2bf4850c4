"""What ``carve inspect`` shows: per layer (producer) its channels, params, MACs, group and prunability with reasons;
per group its width, slices and members; a summary with the frozen reasons. Plain data, rendered by the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from carve.pipeline.graph import Model, attr
from carve.pipeline.graph.channels import ChannelAnalysis, Kind, reason_kind
from carve.pipeline.graph.cost import model_cost


@dataclass
class LayerRow:
    node: str
    op: str
    cin: int | None
    cout: int
    kernel: str
    params: int
    macs: int
    group: int
    prunable: int  # output channels that may be removed
    status: str  # "prunable", "frozen", "partly frozen"
    reason: str  # first frozen reason, if any


@dataclass
class GroupRow:
    id: int
    width: int
    slices: list[int]
    prunable: int
    members: list[str]
    reason: str
    inexact: str = ""  # why removing its channels is not exact (LayerNorm statistics), if it is not


def _kernel(model: Model, node) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        shp = model.shape(node.input[1])
        k = "x".join(str(d) for d in shp[2:]) if shp else "?"
        g = int(attr(node, "group", 1))
        return f"{k}" + (f" g{g}" if g > 1 else "")
    return "-"


def overview(model: Model, analysis: ChannelAnalysis) -> dict:
    cost = model_cost(model)
    layers: list[LayerRow] = []
    for src in analysis.sources:
        if src.kind not in (Kind.OUT, Kind.MEMBER):
            continue
        node = model.nodes[src.name]
        units = analysis.source_units(src)
        frozen = analysis.unit_frozen[units]
        w = model.shape(src.weight)
        if src.kind == Kind.MEMBER:
            cin = src.count // max(1, (w[0] // int(attr(node, "group", 1))) if w else 1)
        elif node.op_type == "Conv":
            cin = w[1] * int(attr(node, "group", 1))
        elif node.op_type == "ConvTranspose":
            cin = w[0]
        else:
            cin = w[1 - src.axis] if w else None
        reason = ""
        if frozen.any():
            reason = analysis.frozen_reasons(int(units[np.flatnonzero(frozen)[0]]))[0]
        status = "frozen" if frozen.all() else "partly frozen" if frozen.any() else "prunable"
        nc = cost.nodes[node.name]
        layers.append(
            LayerRow(
                node.name,
                node.op_type + (" (dw)" if src.kind == Kind.MEMBER else ""),
                cin,
                src.count,
                _kernel(model, node),
                nc.params,
                nc.macs,
                int(analysis.unit_group[units[0]]),
                int((~frozen).sum()),
                status,
                reason,
            )
        )
    groups: list[GroupRow] = []
    for g in analysis.groups:
        fr = analysis.unit_frozen[g.units]
        reason = ""
        if fr.any():
            reason = analysis.frozen_reasons(int(g.units[np.flatnonzero(fr)[0]]))[0]
        groups.append(
            GroupRow(
                g.id,
                g.width,
                [len(s) for s in g.slices],
                int((~fr).sum()),
                list(dict.fromkeys(g.sources)),
                reason,
                g.inexact[0] if g.inexact else "",
            )
        )
    reasons = Counter(reason_kind(rs[0]) for rs in analysis.unit_reasons.values())
    summary = analysis.summary()
    macs_prunable = prunable_macs(analysis, cost)
    summary.update(
        params=cost.params,
        macs=cost.macs,
        macs_prunable=macs_prunable,
        macs_prunable_fraction=macs_prunable / cost.macs if cost.macs else 0.0,
        nodes=len(model.graph.node),
        opset=model.opset,
        frozen_reasons=dict(reasons.most_common()),
    )
    return {"summary": summary, "layers": [asdict(r) for r in layers], "groups": [asdict(g) for g in groups]}


def prunable_macs(analysis: ChannelAnalysis, cost=None) -> int:
    """MACs of the layers whose output channels may be removed (at least partly), plus the products of two
    activations (attention) over channels that may be removed: what ``carve inspect`` calls MACs in prunable
    layers. A layer whose outputs are frozen does not count, even when its inputs shrink."""
    cost = cost or model_cost(analysis.model)
    prunable = ~analysis.unit_frozen
    nodes: set[str] = set()
    for src in analysis.producers():
        if prunable[analysis.source_units(src)].any():
            nodes.add(src.name)
    for rec in analysis.contract_records:
        if prunable[analysis.unit_of[rec.ids]].any():
            nodes.add(rec.node)
    model = analysis.model
    layouts = {**analysis.tensors, **analysis.blocks}
    for node in model.graph.node:
        if node.op_type == "MatMul" and not any(model.is_const(i) for i in node.input):
            c = layouts.get(node.output[0])
            if c is not None and prunable[analysis.unit_of[c.ids]].any():
                nodes.add(node.name)
    return sum(cost.nodes[n].macs for n in nodes if n in cost.nodes)
