"""Parameters and multiply-accumulates (MACs) per node and per model, from static shapes.

MACs count the linear ops that dominate a CNN (Conv, ConvTranspose, Gemm, MatMul) for one sample: symbolic batch
dimensions count as 1. Elementwise ops, pools and normalisations are not counted. Parameters are the elements of
floating-point initializers a node reads (weights, biases, BN statistics); an initializer read by several nodes counts
once in the model total. These are static estimates: a MAC ratio is never a speed-up (see :mod:`pipeline.measure`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .graph import Model, attr

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass
class NodeCost:
    name: str
    op: str
    params: int
    macs: int


@dataclass
class Cost:
    params: int
    macs: int
    nodes: dict[str, NodeCost] = field(default_factory=dict)

    def ratio(self, other: Cost) -> dict[str, float]:
        """``other`` relative to ``self`` (e.g. pruned / original)."""
        return {
            "params": other.params / self.params if self.params else float("nan"),
            "macs": other.macs / self.macs if self.macs else float("nan"),
        }


def _prod(dims) -> int:
    return int(np.prod([d if d else 1 for d in dims], dtype=np.int64)) if dims else 1


def node_macs(model: Model, node: onnx.NodeProto) -> int:
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and len(node.input) >= 2:
        w = model.shape(node.input[1])
        if w is None:
            return 0
        if op == "Conv":
            out = model.shape(node.output[0])
            return _prod(w) * _prod(out[2:]) if out else 0
        inp = model.shape(node.input[0])
        return _prod(w) * _prod(inp[2:]) if inp else 0
    if op == "Gemm":
        a, b = model.shape(node.input[0]), model.shape(node.input[1])
        if a is None or b is None:
            return 0
        rows = a[1] if attr(node, "transA", 0) else a[0]
        return _prod([rows]) * _prod(b)
    if op == "MatMul":
        a, out = model.shape(node.input[0]), model.shape(node.output[0])
        if a is None or out is None or not a:
            return 0
        return _prod(out) * _prod([a[-1]])
    return 0


def node_params(model: Model, node: onnx.NodeProto) -> int:
    return sum(
        _prod(model.init[i].dims)
        for i in set(node.input)
        if i in model.init and model.init[i].data_type in _FLOAT_TYPES
    )


def model_cost(model: Model) -> Cost:
    nodes = {}
    for n in model.graph.node:
        nodes[n.name] = NodeCost(n.name, n.op_type, node_params(model, n), node_macs(model, n))
    used = {i for n in model.graph.node for i in n.input}
    params = sum(_prod(t.dims) for t in model.graph.initializer if t.name in used and t.data_type in _FLOAT_TYPES)
    return Cost(params=params, macs=sum(c.macs for c in nodes.values()), nodes=nodes)
