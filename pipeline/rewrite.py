"""Small graph edits shared by the passes: replace a node by others, remove a node, drop dead constants, and the
im2col patches of a convolution (used by data-aware decomposition and least-squares reconstruction)."""

from __future__ import annotations

import numpy as np
import onnx

from .graph import Model, attr


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


def conv_pads(model: Model, node: onnx.NodeProto) -> list[int]:
    """Explicit [top, left, bottom, right] pads of a 2-D Conv (auto_pad resolved from shapes)."""
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    if auto in ("NOTSET", "VALID"):
        return pads if auto == "NOTSET" else [0, 0, 0, 0]
    x, y = model.shape(node.input[0]), model.shape(node.output[0])
    w = model.shape(node.input[1])
    strides = list(attr(node, "strides", [1, 1]))
    dil = list(attr(node, "dilations", [1, 1]))
    out = []
    for ax in range(2):
        total = max(0, (y[2 + ax] - 1) * strides[ax] + (w[2 + ax] - 1) * dil[ax] + 1 - x[2 + ax])
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return [out[0][0], out[1][0], out[0][1], out[1][1]]


def patches(model: Model, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """im2col of a Conv's input batch: (N * L) x (Cin * kh * kw) rows, in the weight's (c, u, v) order."""
    import torch
    import torch.nn.functional as F

    w = model.shape(node.input[1])
    kh, kw = int(w[2]), int(w[3])
    top, left, bottom, right = conv_pads(model, node)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if any((top, left, bottom, right)):
        t = F.pad(t, (left, right, top, bottom))
    cols = F.unfold(
        t, (kh, kw), dilation=tuple(attr(node, "dilations", [1, 1])), stride=tuple(attr(node, "strides", [1, 1]))
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def rows(model: Model, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """The input rows a linear node multiplies: conv patches, or Gemm/MatMul rows."""
    if node.op_type == "Conv":
        return patches(model, node, x)
    return x.reshape(-1, x.shape[-1])


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
