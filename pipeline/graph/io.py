"""Reading and writing ONNX files: external data, corrupt input caught early, atomic writes that never touch a file
an input reads.

:func:`load` reads a file (with its external data, which must lie inside the model's folder: checked here, whatever
onnx's version) and prepares it for analysis (:func:`carve.pipeline.graph.canonical.prepare`). :func:`save` writes
atomically (a private staging folder next to the target, then a rename), keeps external data external, and refuses an
output that is, or whose external-data file would be, any file an input reads: the input model and every file its
external data really lives in (the ``location`` of each tensor, not a guessed ``<name>.data``), through ``..``, symlinks
and hard links alike. External data is written under a name unique to its content (``<out>.<sha256[:16]>.data``),
renamed into place before the model that references it, and the old pair's data file removed after, so a SIGKILL at
any instant leaves the old pair or the new pair, whole (issue 21). :func:`atomic_write` does the same for reports. How
a file is written safely (staging that a SIGKILL cannot leave behind for long, fsync, the umask's mode) is
:mod:`carve.pipeline.files`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from carve.pipeline.errors import CarveError, first_line
from carve.pipeline.files import atomic_write as atomic_file
from carve.pipeline.files import check_writable, content_hash, fsync_dir, publish, same_file, staging_dir
from carve.pipeline.graph.canonical import prepare
from carve.pipeline.graph.compact import compact
from carve.pipeline.graph.model import Model, attr, itemsize, tensor_nbytes
from carve.pipeline.graph.shapes import check


def load(path: str | os.PathLike, *, prepare_graph: bool = True, input_shape: tuple[int, ...] | None = None) -> Model:
    """Load an ONNX file (with its external data) and prepare it for analysis. Bad input raises :class:`CarveError`.

    ``input_shape`` (``3x224x224``, or with the batch) completes the first input's open dimensions for analysis; it
    is recorded as ``carve.input_shape`` metadata, so the files carve writes remember it."""
    path = Path(path)
    if not path.exists():
        raise CarveError(f"{path}: no such file")
    if path.is_dir():
        raise CarveError(f"{path}: is a directory, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, truncated files, random bytes
        raise CarveError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})",
            hint="is the file complete? re-export it or copy it again",
        ) from None
    bad = _invalid_text(proto)
    if bad is not None:
        raise CarveError(
            f"{path}: not a readable ONNX model (a {bad} field is not valid UTF-8: the file is damaged)",
            hint="is the file complete? re-export it or copy it again",
        )
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise CarveError(f"{path}: not an ONNX model (no graph found)", hint="is the file complete and really ONNX?")
    external = _load_external_data(proto, path)
    _check_tensor_sizes(proto, path)
    if input_shape is not None:
        set_input_shape(proto, input_shape, where=str(path))
    model = prepare(proto, source=path) if prepare_graph else Model(proto, path)
    model.external_data = external
    if prepare_graph:
        _check_input(model, path)
    return model


def _invalid_text(msg) -> str | None:
    """The name of a string field that is not valid UTF-8, or None. ONNX is proto2, whose parser accepts such bytes
    (a flipped bit in a tensor name); Python's protobuf then hands them out as ``bytes`` (or raises when reading), which
    would fail deep inside a pass. Reading every field once here turns that into a one-line error at load."""
    try:
        fields = msg.ListFields()
    except UnicodeDecodeError:
        return type(msg).__name__
    for fd, value in fields:
        values = value if fd.is_repeated else (value,)
        if fd.type == fd.TYPE_STRING:
            if any(not isinstance(v, str) for v in values):
                return f"{type(msg).__name__}.{fd.name}"
        elif fd.type == fd.TYPE_MESSAGE:
            for sub in values:
                bad = _invalid_text(sub)
                if bad is not None:
                    return bad
    return None


def _check_input(model: Model, path: Path) -> None:
    """The prepared model passes the full ONNX checker (strict shape inference): an inconsistent model (an unknown
    attribute, an input whose size contradicts its first layer's weight) is refused here, in one line, instead of
    being written back unchecked by a pass that had nothing to change, or failing inside ONNX Runtime later."""
    try:
        check(model.proto, full=True)
    except CarveError as exc:
        raise CarveError(
            f"{path}: {exc.message}",
            hint="the model is inconsistent as it is; check it with onnx.checker.check_model(model, full_check=True)",
        ) from None
    for node in model.graph.node:  # what ONNX shape inference does not check: a conv's channels against its input
        if node.op_type != "Conv" or len(node.input) < 2 or not model.is_const(node.input[1]):
            continue
        x, w = model.shape(node.input[0]), model.shape(node.input[1])
        group = int(attr(node, "group", 1) or 1)
        if x is not None and len(x) >= 2 and x[1] is not None and w and len(w) >= 2 and x[1] != w[1] * group:
            raise CarveError(
                f"{path}: Conv {node.name!r} reads {x[1]} channels, but its weight {list(w)} with group {group} "
                f"takes {w[1] * group}",
                hint="the model is inconsistent (its input size or the conv's group does not match the weights)",
            )


def set_input_shape(proto: onnx.ModelProto, dims: tuple[int, ...], *, where: str = "model") -> None:
    """Record ``dims`` as the first input's size (``carve.input_shape``), checked against what is declared."""
    import json

    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if not inputs:
        raise CarveError(f"{where}: `input_shape`: the model has no graph input")
    vi = inputs[0]
    declared = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim
    ]
    given = list(dims)
    if len(given) == len(declared) - 1:
        given = [declared[0], *given]  # the batch stays as declared
    if len(given) != len(declared):
        raise CarveError(
            f"{where}: `input_shape` {'x'.join(map(str, dims))} has {len(dims)} sizes; input {vi.name!r} has "
            f"{len(declared)} dimensions (give {len(declared) - 1}, without the batch)"
        )
    for ax, (d, g) in enumerate(zip(declared, given)):
        if d is not None and g is not None and d != g:
            raise CarveError(
                f"{where}: `input_shape` {'x'.join(map(str, dims))} contradicts input {vi.name!r}, whose dimension "
                f"{ax} is declared {d}"
            )
    meta = {p.key: p for p in proto.metadata_props}
    value = json.dumps({vi.name: [None, *given[1:]] if declared[0] is None else given})
    if "carve.input_shape" in meta:
        meta["carve.input_shape"].value = value
    else:
        p = proto.metadata_props.add()
        p.key, p.value = "carve.input_shape", value


def from_proto(proto: onnx.ModelProto, *, prepare_graph: bool = True) -> Model:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    return prepare(p) if prepare_graph else Model(p)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and tensor attributes, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                yield from a.tensors
            elif a.type == onnx.AttributeProto.GRAPH:
                yield from _tensors(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _tensors(sub)


def external_locations(proto: onnx.ModelProto) -> list[str]:
    """The ``location`` of every tensor kept in external data (in order, without repeats)."""
    locs: dict[str, None] = {}
    for t in _tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is not None:
                locs[loc] = None
    return list(locs)


def _inside(base: Path, loc: str) -> Path | None:
    """``base / loc`` resolved (symlinks followed) when it lies inside ``base``; None otherwise."""
    if not loc or os.path.isabs(loc) or Path(loc).drive:
        return None
    target = (base / loc).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        return None
    return target


def _load_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    from onnx.external_data_helper import load_external_data_for_model

    ext = [t for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not ext:
        return False
    base = path.resolve().parent
    for t in ext:
        loc = next((e.value for e in t.external_data if e.key == "location"), None)
        if loc is None:
            raise CarveError(f"{path}: initializer {t.name!r} is external but names no file (no `location`)")
        target = _inside(base, loc)
        if target is None:
            # carve's own containment check (onnx < 1.16 had none): a model may only read files in its folder
            raise CarveError(
                f"{path}: initializer {t.name!r} keeps its data in {loc!r}, outside the model's folder {base}",
                hint="external data must lie in the model's folder (or below it); copy it there and fix `location`",
            )
        if not target.is_file():
            raise CarveError(
                f"{path}: initializer {t.name!r} keeps its data in external file {loc!r}, "
                "which is missing next to the model",
                hint=f"copy {loc!r} into {base} (external data is resolved relative to the .onnx file)",
            )
    files = [path.resolve(), *(_inside(base, loc) for loc in external_locations(proto))]
    try:
        load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise CarveError(f"{path}: could not read its external data ({first_line(exc)})") from None
    _READS[_key(path)] = files
    return True


# files a model file reads (itself and its external data), by (resolved path, mtime, size)
_READS: dict[tuple[str, int, int], list[Path]] = {}
# inputs that are never ONNX models: nothing to parse for external data
_NOT_MODELS = {".json", ".yaml", ".yml", ".md", ".txt", ".npz", ".npy", ".csv", ".png", ".jpg", ".jpeg"}


def _key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def files_read(path: str | os.PathLike) -> list[Path]:
    """The files reading ``path`` touches: the file itself and, for an ONNX model, every file its external data lives
    in (resolved, inside the model's folder). Unreadable or non-model files are just themselves."""
    path = Path(path)
    if not path.is_file():
        return [path.resolve()]
    key = _key(path)
    if key in _READS:
        return _READS[key]
    files = [path.resolve()]
    if path.suffix.lower() not in _NOT_MODELS:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:
            proto = None
        if proto is not None:
            base = path.resolve().parent
            files += [p for p in (_inside(base, loc) for loc in external_locations(proto)) if p is not None]
    _READS[key] = files
    return files


def _check_tensor_sizes(proto: onnx.ModelProto, path: Path) -> None:
    for t in proto.graph.initializer:
        if t.data_type not in onnx.TensorProto.DataType.values() or t.data_type == onnx.TensorProto.UNDEFINED:
            raise CarveError(f"{path}: initializer {t.name!r} has no known element type ({t.data_type})")
        if t.raw_data:
            n = int(np.prod(t.dims, dtype=np.int64))
            size = itemsize(t.data_type)
            if size and len(t.raw_data) != n * size:
                raise CarveError(
                    f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes but its shape {list(t.dims)} needs "
                    f"{n * size}; the file is truncated or corrupt"
                )


def check_output_path(out: str | os.PathLike, *inputs: str | os.PathLike | Model | None) -> Path:
    """Refuse an output that would overwrite a file an input reads, or that cannot be written, before any work is
    done. ``inputs`` are paths (models, reports, recipes) or loaded models; for a model, every file its external
    data lives in counts, and so does the external-data file ``<out>.data`` the output may write."""
    out = check_writable(out)
    data = Path(f"{out}.data")
    for inp in inputs:
        if inp is None:
            continue
        if isinstance(inp, Model):
            if inp.source is None:
                continue
            inp = inp.source
        inp = Path(inp)
        if same_file(out, inp):
            raise CarveError(
                f"{out}: the output path is the input path; carve never overwrites its input",
                hint="choose another output file name",
            )
        for f in files_read(inp)[1:]:
            if same_file(out, f):
                raise CarveError(
                    f"{out}: the output would overwrite the external data of {inp} ({f.name}); carve never "
                    "overwrites its input",
                    hint="choose another output file name",
                )
        for f in files_read(inp):
            if same_file(data, f):
                raise CarveError(
                    f"{out}: its external data would be written to {data.name}, which is the input "
                    f"{'model' if f == files_read(inp)[0] else 'external data'} {f}",
                    hint="choose another output file name",
                )
    return out


def save(
    model: Model | onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check_inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write a model atomically. External data (``<name>.data`` next to it) when the source had it or when >1.8 GB.

    What nothing reads is removed first, from the model itself (:func:`carve.pipeline.graph.compact.compact`: unused
    initializers, stale ``value_info``, unused opset imports), so that no written model carries dead weights."""
    proto = model.proto if isinstance(model, Model) else model
    source = model.source if isinstance(model, Model) else None
    out = check_output_path(path, source, *check_inputs)
    removed = compact(proto)
    if isinstance(model, Model) and removed.initializers:
        model.forget_initializers(removed.initializers)
    if external_data is None:
        had_external = isinstance(model, Model) and model.external_data
        external_data = had_external or sum(tensor_nbytes(t) for t in proto.graph.initializer) > 1_800_000_000
    keep = {f for inp in (source, *check_inputs) if inp is not None for f in files_read(inp)}
    try:
        _write_model(proto, out, external_data, keep)
    except OSError as exc:
        raise CarveError(
            f"{out}: could not write the model ({exc.strerror or exc})",
            hint="check the path, its permissions and the free disk space",
        ) from None
    return out


def _old_data_files(out: Path) -> list[Path]:
    """The external-data files of the model now at ``out`` that are carve's own for that name (``<out>.data`` or
    ``<out>.<hash>.data``): what replacing the model makes unreferenced. Anything else it reads is left alone."""
    if not out.is_file():
        return []
    own = re.compile(rf"^{re.escape(out.name)}(\.[0-9a-f]{{16}})?\.data$")
    parent = out.resolve().parent
    return [f for f in files_read(out)[1:] if f.parent == parent and own.match(f.name)]


def _point_at(model_file: Path, location: str) -> None:
    """Rewrite the ``location`` of every external tensor of the model file (its data stays where it is)."""
    proto = onnx.load(str(model_file), load_external_data=False)
    for t in _tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    model_file.write_bytes(proto.SerializeToString())


def _write_model(proto: onnx.ModelProto, out: Path, external_data: bool, keep: set[Path] = frozenset()) -> None:
    # Everything is written into a private staging folder next to the target, then renamed into place, so a
    # failure leaves neither a partial model nor a partial data file behind; a kill leaves the staging folder, which
    # the next write into this folder removes (carve.pipeline.files). A model with external data is a pair: its data
    # goes under a name unique to the content, published first (no file the old model reads changes), then the model
    # (one rename switches old pair to new), then the old data is removed: a kill at any instant leaves a whole pair.
    parent = out.resolve().parent
    with staging_dir(parent) as tmpdir:
        tmp_model = tmpdir / out.name
        staged_data = tmpdir / f"{out.name}.data"
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)  # save_as_external_data rewrites the proto it is given
            onnx.save_model(
                copy,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=staged_data.name,
                size_threshold=1024,
            )
        else:
            tmp_model.write_bytes(proto.SerializeToString())
        old = _old_data_files(out)
        data_name = None
        if external_data and staged_data.exists():
            data_name = f"{out.name}.{content_hash(staged_data)}.data"
            _point_at(tmp_model, data_name)
            publish(staged_data, parent / data_name)
        publish(tmp_model, out)
        fsync_dir(parent)
        for f in old:
            if f.name != data_name and f not in keep:
                with contextlib.suppress(OSError):
                    f.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, inputs: Iterable[str | os.PathLike | None] = ()):
    """:func:`carve.pipeline.files.atomic_write` for any output file, after refusing one that would overwrite a file
    an input reads (``inputs``: models, reports, recipes)."""
    path = check_output_path(path, *inputs)
    with atomic_file(path, mode) as f:
        yield f
