"""Reading and writing ONNX files: external data, corrupt input caught early, atomic writes that never touch the
model's own input files.

:func:`load` reads a file (with its external data, which must lie inside the model's folder) and prepares it for
analysis (:func:`pipeline.graph.canonical.prepare`). :func:`save` writes atomically (a private staging folder next to
the target, then a rename), keeps external data external, and refuses to overwrite an input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx

from pipeline.errors import CarveError, first_line
from pipeline.graph.canonical import prepare
from pipeline.graph.model import Model, itemsize, tensor_nbytes


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
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})",
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


def _load_external_data(proto: onnx.ModelProto, path: Path) -> bool:
    from onnx.external_data_helper import load_external_data_for_model

    ext = [t for t in _tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
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
        raise CarveError(f"{path}: could not read its external data ({first_line(exc)})") from None
    return True


def _check_tensor_sizes(proto: onnx.ModelProto, path: Path) -> None:
    for t in proto.graph.initializer:
        if t.raw_data:
            n = int(np.prod(t.dims, dtype=np.int64))
            size = itemsize(t.data_type)
            if size and len(t.raw_data) != n * size:
                raise CarveError(
                    f"{path}: initializer {t.name!r} holds {len(t.raw_data)} bytes but its shape {list(t.dims)} needs "
                    f"{n * size}; the file is truncated or corrupt"
                )


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
        external_data = had_external or sum(tensor_nbytes(t) for t in proto.graph.initializer) > 1_800_000_000
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
