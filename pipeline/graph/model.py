"""The indexed ONNX model carve works on: :class:`Model`, a light index around an ``onnx.ModelProto``.

Producers and consumers by tensor name, initializers as numpy arrays (cached), and static shapes from shape
inference on a skeleton of the model (:mod:`carve.pipeline.graph.shapes`). Small helpers every graph module needs live
here too: node attributes, the opset, and the names a control-flow node's subgraphs read from the enclosing scope.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.shapes import Shape, ShapeMap, infer_shapes

SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}


class Model:
    """An ONNX model with an index: producers/consumers by tensor, initializers as arrays, static shapes.

    The index is rebuilt by :meth:`refresh` after structural edits; :meth:`set_array` keeps it current for weight edits.
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        source: Path | None = None,
        *,
        external_data: bool = False,
        shapes: ShapeMap | None = None,
    ) -> None:
        self.proto = proto
        self.source = source
        self.external_data = external_data
        self.refresh(shapes=shapes is None)
        if shapes is not None:  # inferred on this very graph already
            self.shapes = shapes

    # -- index -----------------------------------------------------------------------------------------------------
    def refresh(self, *, shapes: bool = True) -> None:
        g = self.proto.graph
        self.init: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self._arrays: dict[str, np.ndarray] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.nodes: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            self.nodes[n.name] = n
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
            for name in outer_names(n):
                self.consumers[name].append(n)
        self.input_names = [i.name for i in g.input if i.name not in self.init]
        self.output_names = [o.name for o in g.output]
        if shapes:
            self.shapes = infer_shapes(self.proto)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def opset(self) -> int:
        return opset_of(self.proto)

    def is_const(self, name: str) -> bool:
        return name in self.init

    def array(self, name: str) -> np.ndarray:
        """The initializer ``name`` as a numpy array (cached; treat as read-only)."""
        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = numpy_helper.to_array(self.init[name])
            except KeyError:
                raise CarveError(f"tensor {name!r} is not a constant of the model") from None
            self._arrays[name] = arr
        return arr

    def set_array(self, name: str, arr: np.ndarray) -> None:
        """Replace initializer ``name`` in place (same name and dtype)."""
        old = self.init[name]
        shape = np.shape(arr)  # ascontiguousarray makes a 0-d array 1-d: keep scalars scalars
        arr = np.ascontiguousarray(arr, dtype=helper.tensor_dtype_to_np_dtype(old.data_type)).reshape(shape)
        new = numpy_helper.from_array(arr, name)
        old.Clear()
        old.CopyFrom(new)
        self._arrays[name] = arr

    def forget_initializers(self, names: Iterable[str]) -> None:
        """Drop ``names`` from the index after they were removed from the graph (nothing read them)."""
        for name in names:
            self.init.pop(name, None)
            self._arrays.pop(name, None)

    def add_initializer(self, name: str, arr: np.ndarray) -> str:
        name = self.unique_name(name)
        t = numpy_helper.from_array(np.ascontiguousarray(arr).reshape(np.shape(arr)), name)
        self.proto.graph.initializer.append(t)
        self.init[name] = self.proto.graph.initializer[-1]
        self._arrays[name] = arr
        return name

    def unique_name(self, base: str) -> str:
        taken = self._taken_names()
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    def _taken_names(self) -> set[str]:
        g = self.proto.graph
        names = set(self.init) | set(self.producer) | {i.name for i in g.input} | set(self.nodes)
        return names

    def shape(self, name: str) -> Shape | None:
        if name in self.init:
            return tuple(int(d) for d in self.init[name].dims)
        return self.shapes.get(name)

    def dtype(self, name: str) -> int | None:
        if name in self.init:
            return self.init[name].data_type
        return self.shapes.dtypes.get(name)  # type: ignore[attr-defined]

    def copy(self) -> Model:
        p = onnx.ModelProto()
        p.CopyFrom(self.proto)
        m = Model.__new__(Model)
        m.proto, m.source, m.external_data = p, self.source, self.external_data
        m.refresh(shapes=False)
        m.shapes = self.shapes
        return m

    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in self.proto.graph.initializer)

    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}


def opset_of(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def outer_names(node: onnx.NodeProto) -> Iterable[str]:
    """Names a node's subgraphs read from the enclosing scope (If/Loop/Scan capture them implicitly)."""
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for sg in graphs:
            local = {i.name for i in sg.input} | {t.name for t in sg.initializer}
            for n in sg.node:
                local.update(n.output)
            for n in sg.node:
                for i in n.input:
                    if i and i not in local:
                        yield i
                for inner in outer_names(n):
                    if inner not in local:
                        yield inner


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def itemsize(data_type: int) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except Exception:
        return 0


def tensor_nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize(t.data_type)


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def nonfinite_initializers(model: Model) -> list[str]:
    """Names of the floating-point initializers that hold NaN or Inf."""
    bad = []
    for t in model.graph.initializer:
        if t.data_type in _FLOATS:
            try:
                arr = model.array(t.name)
            except Exception:  # unreadable data is reported by whoever reads it
                continue
            if not np.isfinite(arr.astype(np.float32, copy=False)).all():
                bad.append(t.name)
    return bad


def check_finite(model: Model, *, had: Iterable[str] = (), what: str = "the result") -> None:
    """Refuse NaN or Inf in ``model``'s weights, except in the initializers ``had`` (non-finite in the input)."""
    had = set(had)
    new = [n for n in nonfinite_initializers(model) if n not in had]
    if new:
        more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
        raise CarveError(
            f"{what} holds NaN or Inf in initializer {new[0]!r}{more}; nothing was written",
            hint="check the calibration data and the repairs' options (e.g. a refit's ridge) for NaN/Inf or degenerate "
            "values",
        )


def control_flow_nodes(model: Model) -> list[onnx.NodeProto]:
    return [
        n
        for n in model.graph.node
        if n.op_type in SUBGRAPH_OPS
        or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
    ]
