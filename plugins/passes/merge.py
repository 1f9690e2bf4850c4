"""Merge adjacent linear layers into one (exact): EDP's merging half, and linear chains in general.

Efficient Decomposition and Pruning (EDP, IEEE TNNLS 32(10):4499-4513, 2021) trains a compressed-aware block of a basis
layer and a coefficient layer, then merges redundant decomposed layers back. On an ONNX graph the same identity merges
any two linear layers with nothing between them (papers.md section 2):

* Conv A (any kernel/stride/padding/dilation, group 1) then a 1x1 Conv B (stride 1, no padding):
  W'[o] = sum_k B[o, k] A[k],  b' = b_B + B b_A  -- the basis + coefficient pair of ``decompose``;
* a 1x1 Conv A (stride 1, no padding) then Conv B (group 1): W'[o, :, u, v] = sum_c B[o, c, u, v] A[c, :],
  b' = b_B + sum_{u,v} B[:, :, u, v] b_A -- exact when B pads nothing or A has no bias (padding sees zeros, not b_A);
* Gemm then Gemm, MatMul then MatMul (constant weights): W' = W_A W_B, b' = b_A W_B + b_B; two MatMuls with
  constant 2-D weights at any activation rank (a transformer's decomposed projection on [batch, tokens, features]);
* a Conv whose kernel covers its whole (unpadded) input, then Flatten and Gemm: the conv is a matrix on the flattened
  input, so Flatten(x) -> Gemm(G M) with bias G b + g.

``when`` decides per pair: ``always``; ``macs`` (merge when the merged layer has no more MACs than the pair);
``slower`` (time the pair and the merged layer on the chosen backend, interleaved, and keep the faster).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model, attr
from carve.pipeline.graph.conv import conv_pads
from carve.pipeline.graph.precision import refuse_quantized
from carve.pipeline.graph.rewrite import finish, replace_nodes
from carve.pipeline.passes import Pass, PassContext, PassResult, passes


def _bias(model: Model, node: onnx.NodeProto, n: int) -> np.ndarray:
    if len(node.input) > 2 and node.input[2]:
        b = model.array(node.input[2]).astype(np.float64).reshape(-1)
        return np.broadcast_to(b, (n,)).copy()
    return np.zeros(n)


def _has_bias(model: Model, node: onnx.NodeProto) -> bool:
    return len(node.input) > 2 and bool(node.input[2]) and bool(np.any(model.array(node.input[2])))


def _private(model: Model, name: str) -> bool:
    return model.is_const(name) and len(model.consumers.get(name, [])) == 1


def _is_pointwise(model: Model, node: onnx.NodeProto) -> bool:
    w = model.shape(node.input[1])
    return (
        w is not None
        and w[2:] == (1, 1)
        and all(s == 1 for s in attr(node, "strides", [1, 1]))
        and not any(conv_pads(model, node))
        and int(attr(node, "group", 1)) == 1
    )


def gemm_matrix(model: Model, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """A Gemm as y = x M + c with M [K, N] (alpha/beta/transB applied); None if it reads its input transposed."""
    if node.op_type == "MatMul":
        return model.array(node.input[1]).astype(np.float64), np.zeros(model.array(node.input[1]).shape[1])
    if attr(node, "transA", 0):
        return None
    w = model.array(node.input[1]).astype(np.float64) * float(attr(node, "alpha", 1.0))
    m = w.T if attr(node, "transB", 0) else w
    c = _bias(model, node, m.shape[1]) * float(attr(node, "beta", 1.0))
    return m, c


class Pair:
    """Two adjacent linear nodes that can be merged, and how."""

    def __init__(self, kind: str, nodes: list[onnx.NodeProto]) -> None:
        self.kind, self.nodes = kind, nodes

    @property
    def name(self) -> str:
        return "+".join(n.name for n in self.nodes)


def find_pairs(model: Model) -> list[Pair]:
    pairs, used = [], set()
    for a in model.graph.node:
        out = a.output[0] if a.output else ""
        users = model.consumers.get(out, [])
        if a.name in used or len(users) != 1 or out in model.output_names or len(a.input) < 2:
            continue
        b = users[0]
        if b.name in used or b.input[0] != out or not _private(model, a.input[1]):
            continue
        if a.input[2:3] and a.input[2] and not _private(model, a.input[2]):
            continue
        nodes = _conv_as_fc(model, a, b) if b.op_type == "Flatten" else None
        if nodes is not None:
            pairs.append(Pair("conv-flatten-gemm", nodes))
            used.update(n.name for n in nodes)
            continue
        kind = _pair_kind(model, a, b)
        if kind:
            pairs.append(Pair(kind, [a, b]))
            used.update({a.name, b.name})
    return pairs


def _2d(model: Model, node: onnx.NodeProto) -> bool:
    w = model.shape(node.input[1])
    return w is not None and len(w) == 2


def _pair_kind(model: Model, a: onnx.NodeProto, b: onnx.NodeProto) -> str | None:
    """How two linear nodes in a row merge (``conv-1x1``, ``1x1-conv``, ``gemm-gemm``, ``matmul-matmul``), or None
    when they do not (``b``'s parameters must be private constants; convolutions ungrouped; a matrix product on 2-D
    activations, or two MatMuls with constant 2-D weights at any activation rank)."""
    if (
        len(b.input) < 2
        or not _private(model, b.input[1])
        or (b.input[2:3] and b.input[2] and not _private(model, b.input[2]))
    ):
        return None
    if a.op_type == b.op_type == "Conv" and int(attr(a, "group", 1)) == 1 and int(attr(b, "group", 1)) == 1:
        if _is_pointwise(model, b):
            return "conv-1x1"
        if _is_pointwise(model, a) and (not any(conv_pads(model, b)) or not _has_bias(model, a)):
            return "1x1-conv"
        return None
    shape = model.shape(a.output[0])
    if a.op_type in ("Gemm", "MatMul") and b.op_type in ("Gemm", "MatMul") and shape is not None and len(shape) == 2:
        return "gemm-gemm"
    if a.op_type == b.op_type == "MatMul" and _2d(model, a) and _2d(model, b):
        return "matmul-matmul"  # constant 2-D weights: merges at any activation rank
    return None


def _conv_as_fc(model: Model, a: onnx.NodeProto, flat: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Conv -> Flatten -> Gemm where the conv's kernel covers its whole unpadded input (a matrix in disguise)."""
    if a.op_type != "Conv" or int(attr(flat, "axis", 1)) != 1 or flat.output[0] in model.output_names:
        return None
    users = model.consumers.get(flat.output[0], [])
    xs, w = model.shape(a.input[0]), model.shape(a.input[1])
    if (
        len(users) != 1
        or users[0].op_type != "Gemm"
        or users[0].input[0] != flat.output[0]
        or xs is None
        or w is None
        or tuple(xs[2:]) != tuple(w[2:])
        or any(conv_pads(model, a))
        or int(attr(a, "group", 1)) != 1
        or not _private(model, users[0].input[1])
    ):
        return None
    return [a, flat, users[0]]


def merged_nodes(model: Model, pair: Pair) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The node(s) replacing the pair, and the new initializers they read."""
    a, b = pair.nodes[0], pair.nodes[-1]
    dtype = model.array(a.input[1]).dtype
    base = a.name + "_merged"
    if pair.kind == "conv-1x1":
        wa = model.array(a.input[1]).astype(np.float64)
        wb = model.array(b.input[1]).astype(np.float64)[:, :, 0, 0]
        w = (wb @ wa.reshape(wa.shape[0], -1)).reshape(wb.shape[0], *wa.shape[1:])
        bias = wb @ _bias(model, a, wa.shape[0]) + _bias(model, b, wb.shape[0])
        attrs = {x.name: helper.get_attribute_value(x) for x in a.attribute}
        node = helper.make_node("Conv", [a.input[0], base + "_W", base + "_B"], [b.output[0]], name=base, **attrs)
        return [node], {base + "_W": w.astype(dtype), base + "_B": bias.astype(dtype)}
    if pair.kind == "1x1-conv":
        wa = model.array(a.input[1]).astype(np.float64)[:, :, 0, 0]  # [C, Cin]
        wb = model.array(b.input[1]).astype(np.float64)  # [Cout, C, kh, kw]
        w = np.einsum("ocuv,ci->oiuv", wb, wa)
        bias = _bias(model, b, wb.shape[0]) + np.einsum("ocuv,c->o", wb, _bias(model, a, wa.shape[0]))
        attrs = {x.name: helper.get_attribute_value(x) for x in b.attribute}
        node = helper.make_node("Conv", [a.input[0], base + "_W", base + "_B"], [b.output[0]], name=base, **attrs)
        return [node], {base + "_W": w.astype(dtype), base + "_B": bias.astype(dtype)}
    if pair.kind == "matmul-matmul":
        w = model.array(a.input[1]).astype(np.float64) @ model.array(b.input[1]).astype(np.float64)
        node = helper.make_node("MatMul", [a.input[0], base + "_W"], [b.output[0]], name=base)
        return [node], {base + "_W": w.astype(dtype)}
    if pair.kind == "gemm-gemm":
        ma, ca = gemm_matrix(model, a)
        mb, cb = gemm_matrix(model, b)
        w, bias = ma @ mb, ca @ mb + cb
        node = helper.make_node("Gemm", [a.input[0], base + "_W", base + "_B"], [b.output[0]], name=base)
        return [node], {base + "_W": w.astype(dtype), base + "_B": bias.astype(dtype)}
    # conv-flatten-gemm: the Flatten node is replaced too
    wc = model.array(a.input[1]).astype(np.float64)
    m = wc.reshape(wc.shape[0], -1)  # conv as a matrix on the flattened input
    g, cg = gemm_matrix(model, b)  # y = x g + cg
    w = m.T @ g
    bias = _bias(model, a, wc.shape[0]) @ g + cg
    f = helper.make_node("Flatten", [a.input[0]], [base + "_flat"], name=base + "_flatten", axis=1)
    node = helper.make_node("Gemm", [base + "_flat", base + "_W", base + "_B"], [b.output[0]], name=base)
    return [f, node], {base + "_W": w.astype(dtype), base + "_B": bias.astype(dtype)}


def pair_macs(model: Model, pair: Pair) -> int:
    from carve.pipeline.graph.cost import node_macs

    return sum(node_macs(model, n) for n in pair.nodes)


def apply_merge(model: Model, pair: Pair) -> None:
    new, inits = merged_nodes(model, pair)
    for name, arr in inits.items():
        model.add_initializer(name, arr)
    replace_nodes(model, pair.nodes, new)


def submodel(model: Model, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model of just ``nodes`` (reading the first node's input), for timing a pair against its merge."""
    from onnx import numpy_helper

    x = nodes[0].input[0]
    y = nodes[-1].output[0]
    inits = dict(inits or {})
    for n in nodes:
        for i in n.input[1:]:
            if i and i not in inits and model.is_const(i):
                inits[i] = model.array(i)
    xs = [d if d else 1 for d in model.shape(x)]
    g = helper.make_graph(
        list(nodes),
        "pair",
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, xs)],
        [helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=list(model.proto.opset_import))
    m.ir_version = model.proto.ir_version
    return m


@passes.register("merge")
class Merge(Pass):
    exact = True
    description = "merge adjacent linear layers (decomposed pairs, 1x1 chains, Gemm chains) into one"

    def __init__(self, when: str = "always", backend: str = "ort", threads: int = 1, batch: int = 1) -> None:
        if when not in ("always", "macs", "slower"):
            raise CarveError(f"merge `when` must be always, macs or slower; got {when!r}")
        self.when, self.backend, self.threads, self.batch = when, backend, threads, batch

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        refuse_quantized(model, "merge")
        out = model.copy()
        details, merged, kept = [], 0, set()
        while True:  # a merge can create a new pair (a chain of three convs)
            pairs = [p for p in find_pairs(out) if p.name not in kept]
            if not pairs:
                break
            for pair in pairs:
                decision, why = self.decide(out, pair)
                details.append(f"{pair.name}: {'merged' if decision else 'kept'} ({why})")
                if decision:
                    apply_merge(out, pair)
                    out.refresh(shapes=False)
                    merged += 1
                else:
                    kept.add(pair.name)
            finish(out)
        return PassResult(out, merged > 0, details, {"merged": merged, "kept": len(kept), "when": self.when})

    def decide(self, model: Model, pair: Pair) -> tuple[bool, str]:
        if self.when == "always":
            return True, pair.kind
        new, inits = merged_nodes(model, pair)
        after_model = submodel(model, new, inits)
        before_model = submodel(model, pair.nodes)
        from carve.pipeline.graph import from_proto
        from carve.pipeline.graph.cost import model_cost

        macs_pair = pair_macs(model, pair)
        macs_merged = model_cost(from_proto(after_model)).macs
        if self.when == "macs":
            ok = macs_merged <= macs_pair
            return ok, f"MACs {macs_pair:,} as a pair, {macs_merged:,} merged"
        from carve.pipeline.measure.ab import time_ratio

        ratio = time_ratio(before_model, after_model, backend=self.backend, threads=self.threads, batch=self.batch)
        return ratio >= 1.0, f"merged runs {ratio:.2f}x the pair's speed on {self.backend}"
