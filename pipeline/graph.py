"""Load, prepare, index and save ONNX models.

carve works on the ``onnx.ModelProto`` itself, with a light index around it (:class:`Model`): producers and consumers by
tensor name, initializers as numpy arrays, and static shapes from shape inference run on a *skeleton* of the model (the
large initializers replaced by typed graph inputs), which is ~30x cheaper than inferring on the full model.

:func:`load` prepares a model so that analysis sees what the exporter meant rather than how it spelled it:

* ``Constant`` nodes become initializers and small constant subgraphs are folded (the CIFAR ResNet option-A shortcut
  gets its channel pads from ``ConstantOfShape/Concat/Reshape/Transpose/Cast``; ReLU6 limits arrive as ``Constant``);
* ``Identity`` of an initializer (the torch exporter de-duplicates equal initializers and feeds them through
  ``Identity``) is folded into a private copy per use, so only genuinely tied weights stay shared;
* ``Shape`` of statically known dimensions is folded;
* unnamed nodes get unique names (error messages and plans name nodes), nodes are topologically sorted.

None of this changes what the model computes. :func:`save` writes atomically (temporary file, then rename), keeps
external data external, and refuses to overwrite the model's own input files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import CarveError, UnsupportedModelError

MIN_OPSET = 11
# Initializers at most this many elements stay real during skeleton shape inference (shape constants, pads, axes).
_SKELETON_KEEP_ELEMS = 4096
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
_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}

Shape = tuple[int | None, ...]


class Model:
    """An ONNX model with an index: producers/consumers by tensor, initializers as arrays, static shapes.

    The index is rebuilt by :meth:`refresh` after structural edits; :meth:`set_array` keeps it current for weight edits.
    """

    def __init__(self, proto: onnx.ModelProto, source: Path | None = None, *, external_data: bool = False) -> None:
        self.proto = proto
        self.source = source
        self.external_data = external_data
        self.refresh()

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
            for name in _outer_names(n):
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
        arr = np.ascontiguousarray(arr, dtype=helper.tensor_dtype_to_np_dtype(old.data_type))
        new = numpy_helper.from_array(arr, name)
        old.Clear()
        old.CopyFrom(new)
        self._arrays[name] = arr

    def add_initializer(self, name: str, arr: np.ndarray) -> str:
        name = self.unique_name(name)
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
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
        return sum(_tensor_nbytes(t) for t in self.proto.graph.initializer)

    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.proto.metadata_props}


class ShapeMap(dict):
    """tensor name -> static shape (None for symbolic dims); ``dtypes`` holds element types."""

    dtypes: dict[str, int]


# --------------------------------------------------------------------------------------------------------------------
# loading


def load(path: str | os.PathLike, *, prepare_graph: bool = True) -> Model:
    """Load an ONNX file (with its external data) and prepare it for analysis. Bad input raises :class:`CarveError`."""
    path = Path(path)
    if not path.exists():
        raise CarveError(f"{path}: no such file")
    if path.is_dir():
        raise CarveError(f"{path}: is a directory, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated files, random bytes
        raise CarveError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})",
            hint="is the file complete? re-export it or copy it again",
        ) from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise CarveError(f"{path}: not an ONNX model (no graph found)", hint="is the file complete and really ONNX?")
    external = _load_external_data(proto, path)
    _check_tensor_sizes(proto, path)
    model = prepare(proto, source=path) if prepare_graph else Model(proto, path)
    model.external_data = external
    return model


def from_proto(proto: onnx.ModelProto, *, prepare_graph: bool = True) -> Model:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    return prepare(p) if prepare_graph else Model(p)


def _load_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model, uses_external_data

    ext = [t for t in _get_all_tensors(proto) if uses_external_data(t)]
    if not ext:
        return False
    base = path.resolve().parent
    for t in ext:
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc is None or not (base / loc).is_file():
            raise CarveError(
                f"{path}: initializer {t.name!r} keeps its data in external file {loc!r}, "
                "which is missing next to the model",
                hint=f"copy {loc!r} into {base} (external data is resolved relative to the .onnx file)",
            )
    try:
        load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise CarveError(f"{path}: could not read its external data ({_first_line(exc)})") from None
    return True


def _check_tensor_sizes(proto: onnx.ModelProto, path: Path) -> None:
    for t in proto.graph.initializer:
        if t.raw_data:
            n = int(np.prod(t.dims, dtype=np.int64))
            itemsize = _itemsize(t.data_type)
            if itemsize and len(t.raw_data) != n * itemsize:
                raise CarveError(
                    f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes but its shape {list(t.dims)} needs "
                    f"{n * itemsize}; the file is truncated or corrupt"
                )


def opset_of(proto: onnx.ModelProto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


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


def _outer_names(node: onnx.NodeProto) -> Iterable[str]:
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
                for inner in _outer_names(n):
                    if inner not in local:
                        yield inner


def _toposort(g: onnx.GraphProto, where: str) -> None:
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    deps = [set(list(n.input) + list(_outer_names(n))) - available for n in nodes]
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
    if n.domain not in ("", "ai.onnx") or n.op_type in _NEVER_FOLD or n.op_type in _SUBGRAPH_OPS:
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
                start = _attr(n, "start", 0)
                end = _attr(n, "end", None)
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
            live.update(_outer_names(n))
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


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


attr = _attr


# --------------------------------------------------------------------------------------------------------------------
# shapes


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights: they become typed graph inputs. Cheap to infer shapes on and to check."""
    g = proto.graph
    sk = onnx.ModelProto()
    sk.ir_version = proto.ir_version
    sk.opset_import.extend(proto.opset_import)
    sk.graph.name = g.name
    sk.graph.node.extend(g.node)
    init_names = {t.name for t in g.initializer}
    sk.graph.input.extend(i for i in g.input if i.name not in init_names)
    sk.graph.output.extend(g.output)
    for t in g.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= _SKELETON_KEEP_ELEMS:
            sk.graph.initializer.append(t)
        else:
            sk.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return sk


def infer_shapes(proto: onnx.ModelProto) -> ShapeMap:
    """Static shapes of every tensor (None for symbolic dims), from shape inference on the skeleton."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(proto), data_prop=True)
    except Exception as exc:
        raise CarveError(f"shape inference failed on the model: {_first_line(exc)}") from None
    shapes = ShapeMap()
    shapes.dtypes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        shapes.dtypes[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
        shapes.dtypes[t.name] = t.data_type
    return shapes


def check(proto: onnx.ModelProto, *, full: bool = True) -> None:
    """``onnx.checker`` (full check: strict shape inference) on the skeleton; raises CarveError naming the problem."""
    try:
        onnx.checker.check_model(skeleton(proto), full_check=full)
    except Exception as exc:
        raise CarveError(f"the model does not pass onnx.checker: {_first_line(exc)}") from None


# --------------------------------------------------------------------------------------------------------------------
# saving


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output that would overwrite an input, or that cannot be written, before any work is done."""
    out = Path(out)
    parent = out.resolve().parent
    if out.exists() and out.is_dir():
        raise CarveError(f"{out}: is a directory; give a file name for the output")
    if not parent.is_dir():
        raise CarveError(f"{out}: the output directory {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK):
        raise CarveError(f"{out}: the output directory {parent} is not writable")
    if out.exists() and not os.access(out, os.W_OK):
        raise CarveError(f"{out}: the output file exists and is not writable")
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        same = out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(out, inp))
        if same:
            raise CarveError(
                f"{out}: the output path is the input path; carve never overwrites its input",
                hint="choose another output file name",
            )
        if out.resolve() == Path(str(inp) + ".data").resolve() or Path(str(out) + ".data").resolve() == inp.resolve():
            raise CarveError(f"{out}: the output would overwrite the input's external data")
    return out


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check_inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write a model atomically. External data (``<name>.data`` next to it) when the source had it or when >1.8 GB."""
    proto = model.proto if isinstance(model, Model) else model
    source = model.source if isinstance(model, Model) else None
    out = check_output_path(path, source, *check_inputs)
    if external_data is None:
        had_external = isinstance(model, Model) and model.external_data
        external_data = had_external or sum(_tensor_nbytes(t) for t in proto.graph.initializer) > 1_800_000_000
    try:
        _write_model(proto, out, external_data)
    except OSError as exc:
        raise CarveError(
            f"{out}: could not write the model ({exc.strerror or exc})",
            hint="check the path, its permissions and the free disk space",
        ) from None
    return out


def _write_model(proto: onnx.ModelProto, out: Path, external_data: bool) -> None:
    # Everything is written into a private temporary directory next to the target, then renamed into place, so a
    # failure leaves neither a partial model nor a partial data file behind.
    tmpdir = Path(tempfile.mkdtemp(prefix=".carve-", dir=out.resolve().parent))
    try:
        tmp_model = tmpdir / out.name
        data_name = f"{out.name}.data"
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)  # save_as_external_data rewrites the proto it is given
            onnx.save_model(
                copy,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmpdir / data_name, out.resolve().parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Write any output file atomically: a temporary file next to it, renamed into place on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------------------------------
# helpers


def _itemsize(data_type: int) -> int:
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except Exception:
        return 0


def _tensor_nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t.data_type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def control_flow_nodes(model: Model) -> list[onnx.NodeProto]:
    return [
        n
        for n in model.graph.node
        if n.op_type in _SUBGRAPH_OPS
        or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
    ]


__all__ = [
    "Model",
    "load",
    "from_proto",
    "prepare",
    "save",
    "check",
    "check_output_path",
    "infer_shapes",
    "skeleton",
    "atomic_write",
    "attr",
    "opset_of",
    "UnsupportedModelError",
]
