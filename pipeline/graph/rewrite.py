"""Small graph edits shared by the passes: replace nodes by others (keeping topological order), drop what nothing reads,
and give every linear layer an explicit bias that repairs can write into."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph import Model, attr


def replace_nodes(model: Model, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
    """Put ``new`` where the first of ``old`` was (keeping topological order) and remove ``old``."""
    g = model.graph
    names = {n.name for n in old}
    nodes = list(g.node)
    pos = min(k for k, n in enumerate(nodes) if n.name in names)
    kept = [n for n in nodes if n.name not in names]
    before = [n for n in nodes[:pos] if n.name not in names]
    after = kept[len(before) :]
    del g.node[:]
    g.node.extend(before + new + after)


def drop_dead_initializers(model: Model) -> None:
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def finish(model: Model) -> None:
    """After structural edits: drop what nothing reads, forget stale shapes, rebuild the index."""
    drop_dead_initializers(model)
    del model.graph.value_info[:]
    model.refresh()


def ensure_biases(model: Model) -> int:
    """Give every Conv / ConvTranspose / Gemm without a bias an explicit zero bias (before analysis).

    Repairs (least squares, bias correction) write an intercept into the consumers' biases; the bias must exist before
    the channel analysis so that it is cut along with its layer's output channels. Returns how many were added.
    """
    added = 0
    for n in model.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm") or (len(n.input) > 2 and n.input[2]):
            continue
        w = model.shape(n.input[1])
        if w is None or not model.is_const(n.input[1]):
            continue
        if n.op_type == "Conv":
            cout = w[0]
        elif n.op_type == "ConvTranspose":
            cout = w[1] * int(attr(n, "group", 1))
        else:
            cout = w[0] if attr(n, "transB", 0) else w[1]
        dtype = model.array(n.input[1]).dtype
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = model.add_initializer(f"{n.name}_bias", np.zeros(int(cout), dtype=dtype))
        added += 1
    if added:
        model.refresh()
    return added
