"""Canonicalisation: make the graph say what the exporter meant, not how it spelled it. Never changes what the model
computes.

* ``Identity`` of an initializer (the torch exporter de-duplicates equal initializers and feeds them through
  ``Identity``) becomes a private copy per use, so only genuinely tied weights stay shared;
* initializers also listed as graph inputs (old exporters, ``keep_initializers_as_inputs``) are constants, not inputs;
* unnamed nodes get unique names (error messages and plans name nodes);
* with onnx-graphsurgeon: nodes are topologically sorted, ``Constant`` nodes become initializers, constant subgraphs
  are folded (the CIFAR ResNet option-A shortcut gets its channel pads from ``ConstantOfShape/Concat/Reshape/...``;
  ReLU6 limits arrive as ``Constant``), ``Shape`` of statically known dimensions is folded, an ``If`` whose condition
  is a constant is replaced by the branch it takes, and what no output depends on is removed.

Folding never evaluates random or quantisation ops (folding Q/DQ would silently de-quantise a QDQ model), and only copy
ops (Identity, Cast, Reshape, Transpose, ...) may fold constants above a million elements: a Tile or Expand of a
constant stays a runtime op instead of bloating the file. Only the graph's nodes and the new constants are rebuilt; the
original weights are reused, never copied.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from carve.pipeline.errors import CarveError, first_line
from carve.pipeline.graph.model import Model, opset_of, outer_names
from carve.pipeline.graph.shapes import infer_shapes

MIN_OPSET = 11
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
_NEVER_FOLD = _NONDETERMINISTIC | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops that may fold even large constants (they only copy or re-type an existing one).
_COPY_OPS = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}
_FOLD_MAX_ELEMS = 1 << 20

G_LOGGER.severity = G_LOGGER.ERROR  # graphsurgeon's warnings about unfoldable parts are expected, not news
logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


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
    _check_references(g, where)
    _initializers_are_not_inputs(proto)
    _unshare_identities(g)
    _unshare_parameters(g)
    graph = _gs_import(proto, where)
    if not _is_sorted(g):
        _sorted(graph, where)
        _splice(proto, graph)  # shape inference needs the sorted order
    shapes = infer_shapes(proto)
    _annotate_shapes(graph, shapes)
    before = _signature(graph)
    _quiet_onnxruntime()  # graphsurgeon folds with ONNX Runtime, whose warnings would reach the user's terminal
    graph.fold_constants(fold_shapes=True, should_exclude_node=_keep_unfolded, error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False)
    if _signature(graph) != before:  # something was folded or removed
        _sorted(graph, where)
        _splice(proto, graph)
        shapes = None  # folded shape constants can make more shapes static: infer again
    model = Model(proto, source, shapes=shapes)
    _complete_output_types(model)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# what carve does itself (graphsurgeon has no equivalent)


def _name_nodes(g: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, n in enumerate(g.node):
        base = n.name or f"{n.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        n.name = name
        seen.add(name)


def _check_references(g: onnx.GraphProto, where: str) -> None:
    """Every tensor a node reads is a graph input, an initializer or some node's output (a clear error otherwise)."""
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        available.update(n.output)
    for n in g.node:
        for name in [*n.input, *outer_names(n)]:
            if name not in available:
                raise CarveError(f"{where}: node {n.name!r} reads tensor {name!r}, which nothing produces")
    for o in g.output:
        if o.name not in available:
            raise CarveError(f"{where}: graph output {o.name!r} is produced by no node")


def _initializers_are_not_inputs(proto: onnx.ModelProto) -> None:
    g = proto.graph
    inits = {t.name for t in g.initializer}
    if any(i.name in inits for i in g.input):
        inputs = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(inputs)
        proto.ir_version = max(proto.ir_version, 4)  # IR 4 lets initializers stand alone


def _unshare_identities(g: onnx.GraphProto) -> None:
    """``Identity(initializer)`` -> a private initializer under the Identity's output name."""
    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep = []
    for n in g.node:
        standard = n.domain in ("", "ai.onnx")
        if n.op_type == "Identity" and standard and n.input[0] in inits and n.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[n.input[0]])
            copy.name = n.output[0]
            g.initializer.append(copy)
            inits[copy.name] = copy
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


# Ops whose constant operands are per-channel parameters (a bias, a scale, a norm's affine), not weights.
_PARAMETER_READERS = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "PRelu",
}
_PARAMETER_MAX = 1 << 20


def _unshare_parameters(g: onnx.GraphProto) -> None:
    """A float initializer that several elementwise/normalisation nodes read gets a private copy per reader (the
    dynamo exporter, like onnx optimisers, stores equal constants once: every zero bias, every unit LayerNorm scale
    of a model becomes one tensor). The values are equal, so nothing changes; only genuinely tied weights (read by
    Conv/Gemm/MatMul/Gather) stay shared."""
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in inits:
                readers.setdefault(i, []).append((n, k))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    outputs = {o.name for o in g.output}
    taken = set(inits) | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    for name, uses in readers.items():
        t = inits[name]
        if len(uses) < 2 or t.data_type not in floats or name in outputs or int(np.prod(t.dims)) > _PARAMETER_MAX:
            continue
        if any(n.op_type not in _PARAMETER_READERS or n.domain not in ("", "ai.onnx") for n, _ in uses):
            continue
        if int(np.prod(t.dims)) <= 1:
            continue  # scalars broadcast: they cut nothing
        for j, (n, k) in enumerate(uses[1:], 1):
            new = f"{name}__{j}"
            while new in taken:
                new += "_"
            taken.add(new)
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = new
            g.initializer.append(copy)
            n.input[k] = new


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


# ---------------------------------------------------------------------------------------------------------------------
# onnx-graphsurgeon: sorting, folding, cleanup


def _gs_import(proto: onnx.ModelProto, where: str) -> gs.Graph:
    try:
        return gs.import_onnx(proto)  # initializers stay lazy: no weight is copied
    except Exception as exc:
        raise CarveError(f"{where}: onnx-graphsurgeon cannot read the graph ({first_line(exc)})") from None


def _sorted(graph: gs.Graph, where: str) -> None:
    # graphsurgeon's sort recurses along the longest path: give deep graphs room
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * len(graph.nodes) + 1000))
    try:
        graph.toposort()
    except Exception as exc:  # graphsurgeon reports a cycle through its logger's exception
        raise CarveError(f"{where}: the graph cannot be sorted ({first_line(exc)})", hint="is there a cycle?") from None
    finally:
        sys.setrecursionlimit(limit)


def _annotate_shapes(graph: gs.Graph, shapes) -> None:
    """Static shapes for graphsurgeon's Shape folding, from carve's (cheap, skeleton) shape inference."""
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and t.shape is None and name in shapes:
            t.shape = [d if d is not None else f"{name}_{k}" for k, d in enumerate(shapes[name])]


def _quiet_onnxruntime() -> None:
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass


def _signature(graph: gs.Graph) -> tuple[int, int]:
    """Changes when folding or cleanup did something: (nodes, constants)."""
    return len(graph.nodes), sum(isinstance(t, gs.Constant) for t in graph.tensors().values())


def _is_sorted(g: onnx.GraphProto) -> bool:
    seen = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    for n in g.node:
        if any(i not in seen for i in [*n.input, *outer_names(n)]):
            return False
        seen.update(n.output)
    return True


def _keep_unfolded(node: gs.Node) -> bool:
    if node.domain not in ("", "ai.onnx", None) or node.op in _NEVER_FOLD:
        return True
    if node.op in _COPY_OPS:
        return False
    for t in node.inputs:
        shape = t.shape
        if shape is not None and all(isinstance(d, int) for d in shape) and int(np.prod(shape)) > _FOLD_MAX_ELEMS:
            return True
    return False


def _splice(proto: onnx.ModelProto, graph: gs.Graph) -> None:
    """Write graphsurgeon's nodes and constants back into ``proto``: the nodes are rebuilt, the original weights are
    kept in place (unused ones dropped), folded constants are added."""
    g = proto.graph
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    used = {o.name for o in g.output}
    for n in nodes:
        used.update(i for i in n.input if i)
        used.update(outer_names(n))
    constants = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    originals = {t.name for t in g.initializer}
    for k in reversed(range(len(g.initializer))):
        name = g.initializer[k].name
        reused = name in constants and isinstance(constants[name]._values, LazyValues)
        if name not in used or not reused:
            del g.initializer[k]
            originals.discard(name)
    for name in sorted(used - originals):
        c = constants.get(name)
        if c is not None:
            g.initializer.append(numpy_helper.from_array(np.asarray(c.values), name))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
