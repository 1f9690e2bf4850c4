"""Parameters and multiply-accumulates (MACs) per node and per model, from static shapes.

MACs count the linear ops that dominate a CNN (Conv, ConvTranspose, Gemm, MatMul) for one sample: symbolic batch
dimensions count as 1. Elementwise ops, pools and normalisations are not counted. Parameters are the elements of
floating-point initializers a node reads (weights, biases, BN statistics; in a QDQ model the quantized weights and
biases behind DequantizeLinear, not its scales); an initializer read by several nodes counts once in the model total.
These are static estimates: a MAC ratio is never a speed-up (see :mod:`carve.pipeline.measure.ab`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from carve.pipeline.graph import Model, attr

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
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


def _param_names(model: Model) -> set[str]:
    """The initializers that are parameters: floating-point ones, and in a QDQ model the quantized weights and biases
    a DequantizeLinear reads, but not the Q/DQ scales and zero points (calibration metadata, not parameters)."""
    nodes = model.graph.node
    quant_data = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"}
    quant_meta = {n.input[i] for n in nodes if n.op_type in _QDQ for i in (1, 2) if i < len(n.input)}
    return {
        name
        for name, t in model.init.items()
        if name in quant_data or (t.data_type in _FLOAT_TYPES and name not in quant_meta)
    }


def node_params(model: Model, node: onnx.NodeProto, params: set[str] | None = None) -> int:
    params = _param_names(model) if params is None else params
    return sum(_prod(model.init[i].dims) for i in set(node.input) if i in params)


def model_cost(model: Model) -> Cost:
    names = _param_names(model)
    nodes = {}
    for n in model.graph.node:
        nodes[n.name] = NodeCost(n.name, n.op_type, node_params(model, n, names), node_macs(model, n))
    used = {i for n in model.graph.node for i in n.input}
    params = sum(_prod(t.dims) for t in model.graph.initializer if t.name in used and t.name in names)
    return Cost(params=params, macs=sum(c.macs for c in nodes.values()), nodes=nodes)


def activation_products(analysis, base: Cost) -> list[tuple[np.ndarray, int]]:
    """Per MatMul of two activations (attention's ``q @ k^T`` and ``attn @ v``) whose channels can be pruned: the
    channel units over its iteration space, flattened, and its MACs. Its MACs scale with the kept fraction of them:

    * channels contracted (Q/K of each head, on the heads and the contracted axis): the iteration space over those
      axes is the contracted operand's channel array (the larger of the two, the other broadcasts against it);
    * channels carried (heads on a batch axis, V's channels on a free axis): they are the output's channel layout.

    Widths within a head are pruned in lockstep, so a kept set is rectangular and its size is the product of the kept
    counts per axis: MACs = M x N x K x batch scale exactly with it, as :func:`model_cost` counts the result."""
    model = analysis.model
    contracted: dict[str, np.ndarray] = {}
    for rec in analysis.contract_records:
        if rec.node not in contracted or rec.ids.size > contracted[rec.node].size:
            contracted[rec.node] = rec.ids
    layouts = {**analysis.tensors, **analysis.blocks}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or any(model.is_const(i) for i in node.input[:2]):
            continue
        macs = base.nodes[node.name].macs if node.name in base.nodes else 0
        ids = contracted.get(node.name)
        if ids is None and node.output[0] in layouts:
            ids = layouts[node.output[0]].ids
        if macs and ids is not None and ids.size:
            out.append((analysis.unit_of[np.asarray(ids).reshape(-1)], macs))
    return out


class CostModel:
    """Params and MACs of the model a removal mask would produce, without doing the surgery.

    Pruning never changes spatial sizes, so a Conv/ConvTranspose/Gemm/MatMul's MACs scale exactly with its weight's
    element count, and every cut tensor's size is the product of its kept counts along the cut axes; a MatMul of two
    activations scales with the kept part of its channels (:func:`activation_products`). Used by the allocators to
    bisect towards ``--target-macs`` / ``--target-params``, and by the knapsack's MAC table (one cost model: what
    :func:`model_cost` counts on the pruned model).
    """

    def __init__(self, analysis) -> None:
        model = analysis.model
        self.analysis = analysis
        self.base = model_cost(model)
        cuts: dict[str, dict[int, np.ndarray]] = {}
        for rec in analysis.slice_records:
            cuts.setdefault(rec.tensor, {}).setdefault(rec.axis, analysis.unit_of[rec.ids])
        used = {i for n in model.graph.node for i in n.input}
        params = _param_names(model)
        self.tensors: list[tuple[tuple[int, ...], dict[int, np.ndarray], bool, int]] = []
        # per cut initializer: (dims, {axis: units}, is_param, MACs of the nodes whose weight it is)
        weight_macs: dict[str, int] = {}
        for n in model.graph.node:
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
                weight_macs[n.input[1]] = weight_macs.get(n.input[1], 0) + self.base.nodes[n.name].macs
        for name, axes in cuts.items():
            t = model.init[name]
            is_param = name in used and name in params
            self.tensors.append((tuple(int(d) for d in t.dims), axes, is_param, weight_macs.get(name, 0)))
        for units, macs in activation_products(analysis, self.base):
            self.tensors.append(((len(units),), {0: units}, False, macs))

    def __call__(self, removed: np.ndarray) -> tuple[int, int]:
        """(params, MACs) after removing the units in the boolean mask ``removed``."""
        params, macs = self.base.params, self.base.macs
        keep = ~np.asarray(removed, dtype=bool)
        for dims, axes, is_param, wmacs in self.tensors:
            new = list(dims)
            for axis, units in axes.items():
                new[axis] = int(keep[units].sum())
            old_n, new_n = _prod(dims), _prod(new) if all(new) else 0
            if is_param:
                params -= old_n - new_n
            if wmacs and old_n:
                macs -= wmacs - int(round(wmacs * new_n / old_n))
        return params, macs

    def ratios(self, removed: np.ndarray) -> tuple[float, float]:
        p, m = self(removed)
        return p / self.base.params if self.base.params else 1.0, m / self.base.macs if self.base.macs else 1.0


def bilinear_ratio(shares: dict[int, float], pairs: list[tuple[int, int, float]], factors: dict[int, float]) -> float:
    """A pruned model's cost as a fraction of the original's from per-group factors F_g (groups not given: 1):
    ``1 + sum_g t_g (F_g - 1) + sum_(g,h) tau_gh (F_g - 1)(F_h - 1)``. Exact for MACs (a layer between groups a and b
    costs M F_a F_b); a latency table fits the same form to measurements."""
    p = 1.0 + sum(shares[g] * (f - 1.0) for g, f in factors.items() if g in shares)
    p += sum(t * (factors.get(a, 1.0) - 1.0) * (factors.get(b, 1.0) - 1.0) for a, b, t in pairs)
    return float(p)
