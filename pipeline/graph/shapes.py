"""Static shapes and the ONNX checker, both run on a *skeleton* of the model: the large initializers replaced by
typed graph inputs, which is much cheaper than inferring or checking the full model (no weights are read or copied)
and gives the same answer.

Shapes are inferred for the model's *declared input*, completed where the declaration leaves a dimension open:
``carve.input_shape`` metadata (``--input-shape``), else ``carve.preprocess`` (written by ``carve export``), else a
channel count read off the first convolution's weight. When ONNX shape inference still leaves sizes open (exporters
compute reshape targets at run time from ``Shape`` ops: ShuffleNet's channel shuffle, a fully dynamic input), the
model is run once in ONNX Runtime at batch 1 and once at batch 2 with every intermediate tensor exposed: a dimension
equal in both runs is static, one that differs follows the batch. MACs are only right when every convolution's output
size is known; :func:`unknown_conv_outputs` names the ones that are not.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.errors import CarveError, first_line

# Initializers at most this many elements stay real during skeleton shape inference (shape constants, pads, axes).
_SKELETON_KEEP_ELEMS = 4096


Shape = tuple[int | None, ...]


class ShapeMap(dict):
    """tensor name -> static shape (None for symbolic dims); ``dtypes`` holds element types."""

    dtypes: dict[str, int]


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


def declared_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _declared(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]


def input_hints(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Per graph input, its dimensions as far as they are known: declared, else ``carve.input_shape`` metadata
    (``--input-shape``), else ``carve.preprocess`` (channels and size of an NCHW input), else the channel count of
    the convolution it feeds. None where still open (axis 0, the batch, stays open unless declared)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    given: dict = {}
    try:
        given = json.loads(meta.get("carve.input_shape", "{}"))
        pre = json.loads(meta.get("carve.preprocess", "{}"))
    except (json.JSONDecodeError, TypeError):
        pre = {}
    if not isinstance(given, dict):
        given = {}
    if not isinstance(pre, dict):
        pre = {}
    out = {}
    inputs = declared_inputs(proto)
    for k, vi in enumerate(inputs):
        if not vi.type.tensor_type.HasField("shape"):
            continue
        dims = _declared(vi)
        hint = given.get(vi.name)
        if isinstance(hint, list) and len(hint) == len(dims):
            dims = [d if d is not None else (h if isinstance(h, int) and h > 0 else None) for d, h in zip(dims, hint)]
        if k == 0 and len(dims) == 4:
            size, channels = pre.get("size"), pre.get("channels")
            if dims[1] is None and isinstance(channels, int) and channels > 0:
                dims[1] = channels
            if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
                dims[2] = dims[2] or size[0]
                dims[3] = dims[3] or size[1]
        if len(dims) >= 3 and dims[1] is None:
            dims[1] = _channels_from_conv(proto, vi.name)
        out[vi.name] = dims
    return out


def _channels_from_conv(proto: onnx.ModelProto, name: str) -> int | None:
    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Conv" and n.input and n.input[0] == name and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]].dims
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            return int(w[1]) * int(group) if len(w) > 1 else None
    return None


def concrete_input_shapes(proto: onnx.ModelProto, batch: int = 1, *, strict: bool = False) -> dict[str, tuple]:
    """Concrete ``(shape, numpy dtype)`` per graph input at ``batch``: open batch axes become ``batch``, other open
    dimensions come from :func:`input_hints`; one that stays open is a CarveError saying how to give it.
    ``strict``: a static batch other than ``batch`` is an error too (an engine must run what it is asked to)."""
    hints = input_hints(proto)
    out = {}
    for k, vi in enumerate(declared_inputs(proto)):
        tt = vi.type.tensor_type
        dims = list(hints.get(vi.name, []))
        if dims and dims[0] is None:
            dims[0] = batch
        elif dims and strict and dims[0] != batch and k == 0:
            raise CarveError(
                f"input {vi.name!r} has a static batch of {dims[0]}; it cannot run at batch {batch}",
                hint=f"use batch {dims[0]}, or re-export the model with a dynamic batch",
            )
        open_axes = [str(ax) for ax, d in enumerate(dims) if d is None]
        if open_axes:
            names = [d.dim_param or "?" for d in tt.shape.dim]
            raise CarveError(
                f"input {vi.name!r} has open dimensions {', '.join(f'{a} ({names[int(a)]})' for a in open_axes)} "
                f"(declared {'x'.join(names[i] if d is None else str(d) for i, d in enumerate(_declared(vi)))}); "
                "carve needs concrete sizes to run it",
                hint="give `input_shape`, e.g. 3x224x224 (channels x height x width)",
            )
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            raise CarveError(f"input {vi.name!r} has no usable element type ({tt.elem_type})") from None
        out[vi.name] = (tuple(int(d) for d in dims), dtype)
    return out


def infer_shapes(proto: onnx.ModelProto) -> ShapeMap:
    """Static shapes of every tensor (None for symbolic dims), from shape inference on the skeleton with the input
    dimensions :func:`input_hints` knows, completed by two ONNX Runtime runs where that leaves sizes open."""
    sk = skeleton(proto)
    hints = input_hints(proto)
    for vi in sk.graph.input:
        dims = hints.get(vi.name)
        if dims is None:
            continue
        for d, v in zip(vi.type.tensor_type.shape.dim, dims):
            if v is not None and not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = v
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except Exception as exc:
        raise CarveError(f"shape inference failed on the model: {first_line(exc)}") from None
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
    open_tensors = _open(proto, shapes)
    if open_tensors:
        for name, shp in _run_shapes(proto, open_tensors).items():
            shapes[name] = shp
    return shapes


def _open(proto: onnx.ModelProto, shapes: ShapeMap) -> list[str]:
    """Node outputs whose shape is unknown or open beyond axis 0."""
    out = []
    for n in proto.graph.node:
        for o in n.output:
            if o:
                s = shapes.get(o)
                if s is None or any(d is None for d in s[1:]):
                    out.append(o)
    return out


def _run_shapes(proto: onnx.ModelProto, names: list[str]) -> dict[str, tuple]:
    """Shapes of ``names`` from ONNX Runtime runs at batch 1 and 2 (a dimension that differs follows the batch and
    stays None). Empty when the model cannot run here (open input sizes, an op ORT lacks)."""
    try:
        runs = [_run_once(proto, names, batch) for batch in (1, 2)]
    except Exception:  # shape completion is best effort: what stays unknown is reported by its users
        return {}
    out = {}
    for name in names:
        a, b = runs[0].get(name), runs[1].get(name)
        if a is None or b is None or len(a) != len(b):
            continue
        out[name] = tuple(x if x == y else None for x, y in zip(a, b))
    return out


def _run_once(proto: onnx.ModelProto, names: list[str], batch: int) -> dict[str, tuple]:
    import onnxruntime as ort

    feeds = {}
    rng = np.random.default_rng(0)
    for name, (shape, dtype) in concrete_input_shapes(proto, batch).items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    del m.graph.output[:]
    for n in dict.fromkeys(names):
        m.graph.output.append(onnx.ValueInfoProto(name=n))  # untyped: ONNX Runtime fills the type in
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    return {o.name: tuple(np.shape(v)) for o, v in zip(sess.get_outputs(), outs)}


def unknown_conv_outputs(model) -> list[str]:
    """Convolutions (and matrix products) whose output size is not fully known: their MACs cannot be counted."""
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            probe = n.output[0] if n.op_type != "ConvTranspose" else n.input[0]
            s = model.shape(probe)
            if s is None or any(d is None for d in s[1:]):
                out.append(n.name)
    return out


def check(proto: onnx.ModelProto, *, full: bool = True) -> None:
    """``onnx.checker`` (full check: strict shape inference) on the skeleton; raises CarveError naming the problem."""
    try:
        onnx.checker.check_model(skeleton(proto), full_check=full)
    except Exception as exc:
        raise CarveError(f"the model does not pass onnx.checker: {first_line(exc)}") from None


def verify_structure(output_shapes: dict[str, Shape | None], after, *, what: str) -> None:
    """What every graph edit must keep: the graph outputs' static shapes (``output_shapes``, taken before the edit)
    and a model that passes the full ONNX checker. A changed output shape is a bug in ``what`` (AssertionError)."""
    for name, s0 in output_shapes.items():
        s1 = after.shape(name)
        if s0 is not None and s1 is not None and s0 != s1:
            raise AssertionError(f"{what} changed the shape of graph output {name!r}: {s0} -> {s1}")
    check(after.proto, full=True)
