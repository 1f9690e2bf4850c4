"""Canonicalisation: make the graph say what the exporter meant, not how it spelled it. Never changes what the model
computes.

* ``Constant`` nodes become initializers and small constant subgraphs are folded (the CIFAR ResNet option-A shortcut
  gets its channel pads from ``ConstantOfShape/Concat/Reshape/Transpose/Cast``; ReLU6 limits arrive as ``Constant``);
* ``Identity`` of an initializer (the torch exporter de-duplicates equal initializers and feeds them through
  ``Identity``) is folded into a private copy per use, so only genuinely tied weights stay shared;
* ``Shape`` of statically known dimensions is folded;
* unnamed nodes get unique names (error messages and plans name nodes), nodes are topologically sorted, and what no
  output depends on is removed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pipeline.errors import CarveError
from pipeline.graph.model import SUBGRAPH_OPS, Model, attr, opset_of, outer_names

MIN_OPSET = 11


# Constant subgraphs are folded only while their results stay small; big constants pass through Identity/Cast only.
_FOLD_MAX_ELEMS = 1 << 20


_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


# Ops that may be folded even when their result is large (they only copy or re-type an existing constant).
_COPY_OPS = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}


# Folding Q/DQ would silently de-quantize a QDQ model: the runtime must see them.
_NEVER_FOLD = _NONDETERMINISTIC | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def prepare(proto: onnx.ModelProto, source: Path | None = None) -> Model:
    """Make the graph canonical for analysis (see module docstring). Never changes what the model computes."""
    where = str(source) if source else "model"
    opset = opset_of(proto)
    if opset < MIN_OPSET:
        raise CarveError(
            f"{where}: uses opset {opset}; carve supports opset {MIN_OPSET} and newer",
            hint="convert it first: onnx.version_converter.convert_version(model, 13)",
        )
    g = proto.graph
    _name_nodes(g)
    _toposort(g, where)
    _constants_to_initializers(g, opset)
    model = Model(proto, source)
    if _fold_constants(model):
        model.refresh()
    if _fold_shapes(model):
        _fold_constants(model)
        model.refresh()
    _remove_dead(model)
    _complete_output_types(model)
    return model


def _complete_output_types(model: Model) -> None:
    """Give graph outputs declared without a shape the inferred one (the full checker requires it)."""
    for out in model.graph.output:
        tt = out.type.tensor_type
        shp = model.shapes.get(out.name)
        dtype = model.shapes.dtypes.get(out.name)
        if shp is None or tt.HasField("shape"):
            continue
        if not tt.elem_type and dtype:
            tt.elem_type = dtype
        dims = tt.shape.dim
        for k, d in enumerate(shp):
            dim = dims.add()
            if d is not None:
                dim.dim_value = d
            else:
                dim.dim_param = f"{out.name}_dim{k}"


def _name_nodes(g: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, n in enumerate(g.node):
        base = n.name or f"{n.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        n.name = name
        seen.add(name)


def _toposort(g: onnx.GraphProto, where: str) -> None:
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    deps = [set(list(n.input) + list(outer_names(n))) - available for n in nodes]
    producers: dict[str, int] = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            producers[o] = idx
    order: list[int] = []
    state = [0] * len(nodes)  # 0 new, 1 visiting, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, iter(sorted(deps[start])))]
        state[start] = 1
        while stack:
            idx, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[idx] = 2
                order.append(idx)
                continue
            p = producers.get(nxt)
            if p is None:
                raise CarveError(f"{where}: node {nodes[idx].name!r} reads tensor {nxt!r}, which nothing produces")
            if state[p] == 1:
                raise CarveError(f"{where}: the graph has a cycle through node {nodes[p].name!r}")
            if state[p] == 0:
                state[p] = 1
                stack.append((p, iter(sorted(deps[p]))))
    if order != list(range(len(nodes))):
        del g.node[:]
        g.node.extend(nodes[i] for i in order)


def _constants_to_initializers(g: onnx.GraphProto, opset: int) -> None:
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0]:
            arr = _eval_nodes([n], {}, opset)[n.output[0]]
            g.initializer.append(numpy_helper.from_array(np.asarray(arr), n.output[0]))
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _foldable(model: Model, n: onnx.NodeProto) -> bool:
    if n.domain not in ("", "ai.onnx") or n.op_type in _NEVER_FOLD or n.op_type in SUBGRAPH_OPS:
        return False
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
        return False
    ins = [i for i in n.input if i]
    if not all(i in model.init for i in ins):
        return False
    if not ins:
        return n.op_type in ("ConstantOfShape", "Range", "EyeLike")
    if n.op_type in _COPY_OPS:
        return True
    return all(int(np.prod(model.init[i].dims, dtype=np.int64)) <= _FOLD_MAX_ELEMS for i in ins)


def _fold_constants(model: Model) -> bool:
    """Evaluate nodes whose inputs are all constants; replace them by initializers. Returns whether anything changed."""
    g = model.graph
    graph_outputs = set(model.output_names)
    changed = False
    keep = []
    for n in g.node:
        if _foldable(model, n) and not (set(n.output) & graph_outputs):
            try:
                values = _eval_nodes([n], {i: model.array(i) for i in n.input if i}, model.opset)
            except Exception:
                keep.append(n)  # the reference evaluator lacks this op/type: leave it to the runtime
                continue
            for o in n.output:
                if o and o in values:
                    t = numpy_helper.from_array(np.asarray(values[o]), o)
                    g.initializer.append(t)
                    model.init[o] = g.initializer[-1]
            changed = True
        else:
            keep.append(n)
    if changed:
        del g.node[:]
        g.node.extend(keep)
    return changed


def _fold_shapes(model: Model) -> bool:
    """Replace ``Shape(x)`` by a constant when x's shape is static; ``Gather``/``Slice`` of the static part likewise."""
    g = model.graph
    changed = False
    keep = []
    for n in g.node:
        if n.op_type == "Shape" and n.input[0] not in model.init:
            shp = model.shape(n.input[0])
            if shp is not None:
                start = attr(n, "start", 0)
                end = attr(n, "end", None)
                dims = list(shp)[start:end]
                if all(d is not None for d in dims):
                    g.initializer.append(numpy_helper.from_array(np.array(dims, dtype=np.int64), n.output[0]))
                    changed = True
                    continue
        keep.append(n)
    if changed:
        del g.node[:]
        g.node.extend(keep)
    return changed


def _remove_dead(model: Model) -> None:
    g = model.graph
    live = set(model.output_names)
    keep = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
            live.update(outer_names(n))
    keep.reverse()
    changed = len(keep) != len(g.node)
    if changed:
        del g.node[:]
        g.node.extend(keep)
    dead_init = [t for t in g.initializer if t.name not in live]
    if dead_init:
        names = {t.name for t in dead_init}
        kept = [t for t in g.initializer if t.name not in names]
        del g.initializer[:]
        g.initializer.extend(kept)
        # initializers may also be listed as graph inputs (IR < 4): drop those entries too
        inputs = [i for i in g.input if i.name not in names]
        del g.input[:]
        g.input.extend(inputs)
    if changed or dead_init:
        model.refresh()


def _eval_nodes(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], opset: int) -> dict[str, np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(_mini_model(nodes, feeds, opset))
    outs = [o for n in nodes for o in n.output if o]
    return dict(zip(outs, ev.run(outs, feeds)))


def _mini_model(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], opset: int) -> onnx.ModelProto:
    inputs = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
        for k, v in feeds.items()
    ]
    outs = [helper.make_value_info(o, onnx.TypeProto()) for n in nodes for o in n.output if o]
    graph = helper.make_graph(nodes, "fold", inputs, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
