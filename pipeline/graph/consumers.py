"""A consumer's view of pruning: which input columns of which Conv/Gemm/MatMul a plan removes, the consumer's weight
as a matrix acting on its input rows (im2col patches or features), and writing a refit matrix and bias back. What
the post-training repairs (``plugins/repairs/``) share."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model, attr
from carve.pipeline.graph.plan import Plan


def consumer_columns(plan: Plan) -> dict[str, tuple[str, int, np.ndarray]]:
    """node -> (weight, axis, kept mask over the weight's input axis) for consumers that lose columns."""
    an = plan.analysis
    out = {}
    for rec in an.slice_records:
        if rec.role != "in":
            continue
        keep = ~plan.removed[an.unit_of[rec.ids]]
        if keep.all():
            continue
        node = an.model.nodes[rec.node]
        if node.op_type == "Gemm" and (float(attr(node, "alpha", 1.0)) != 1 or float(attr(node, "beta", 1.0)) != 1):
            continue  # scaled Gemms keep plain pruning
        if node.op_type == "Conv" and int(attr(node, "group", 1)) != 1:
            continue  # grouped convs (pruned by equal widths) too: their columns are per group, not im2col rows
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            out[rec.node] = (rec.tensor, rec.axis, keep)
    return out


def weight_matrix(model: Model, node: onnx.NodeProto, weight: str, axis: int) -> np.ndarray:
    """The consumer as a matrix acting on input rows (patches or features): Cout x D."""
    w = model.array(weight).astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w.T if axis == 0 else w  # Gemm transB=0 / MatMul: [K, N]; Gemm transB=1: [N, K]


def write_matrix(model: Model, node: onnx.NodeProto, weight: str, axis: int, m: np.ndarray) -> None:
    dtype = model.array(weight).dtype
    shape = model.array(weight).shape
    arr = m.reshape(shape) if node.op_type == "Conv" else (m.T if axis == 0 else m)
    model.set_array(weight, arr.astype(dtype))


def bias_vector(model: Model, node: onnx.NodeProto, count: int) -> np.ndarray:
    """The consumer's bias as a float64 vector of ``count`` outputs (zeros when it has none, e.g. MatMul)."""
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        return model.array(node.input[2]).astype(np.float64).reshape(-1)
    return np.zeros(count)


def add_bias(model: Model, node: onnx.NodeProto, delta: np.ndarray) -> None:
    if node.op_type == "MatMul":
        return  # no bias input: the intercept is dropped (documented limitation)
    if not (len(node.input) > 2 and node.input[2]):
        raise CarveError(
            f"{node.op_type} {node.name!r} has no bias to take the correction",
            hint="call carve.pipeline.graph.rewrite.ensure_biases(model) before analysing (carve prune does)",
        )
    b = model.array(node.input[2])
    model.set_array(node.input[2], (b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype))
