"""The smallest ONNX Runtime helpers: a CPU session for a model, concrete input shapes, deterministic random feeds, and
one run. Verification, capture and evaluation use these; timed runs go through :mod:`carve.pipeline.measure.backends`,
which configures sessions for measurement."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from carve.pipeline.graph.model import Model
from carve.pipeline.graph.shapes import concrete_input_shapes


def session(
    model: Model | onnx.ModelProto | str | os.PathLike, *, threads: int = 1, providers: list[str] | None = None
):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if isinstance(model, str | os.PathLike):
        src: bytes | str = str(Path(model))
    else:
        proto = model.proto if isinstance(model, Model) else model
        src = proto.SerializeToString()
    return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])


def input_specs(
    proto: onnx.ModelProto, batch: int = 1, *, strict: bool = False
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Graph inputs with concrete shapes: an open batch axis becomes ``batch``, other open dimensions come from
    what the model says about its input (:func:`carve.pipeline.graph.shapes.concrete_input_shapes`; a CarveError naming
    the dimension when nothing does). ``strict``: a static batch other than ``batch`` is refused."""
    return concrete_input_shapes(proto, batch, strict=strict)


def random_feeds(model: Model | onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    proto = model.proto if isinstance(model, Model) else model
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in input_specs(proto, batch).items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def run(
    model: Model | onnx.ModelProto | str | os.PathLike, feeds: dict[str, np.ndarray], *, threads: int = 1
) -> list[np.ndarray]:
    return session(model, threads=threads).run(None, feeds)


def run_checked(model, feeds: dict[str, np.ndarray], *, what: str = "the model") -> list[np.ndarray]:
    """:func:`run` on a model that comes from the user (or is the user's model with weights changed): ONNX Runtime
    refusing it is a user error naming ``what``, not a crash. Models carve built itself are run with :func:`run`,
    so their failures stay bugs."""
    from carve.pipeline.errors import CarveError, first_line

    try:
        return run(model, feeds)
    except CarveError:
        raise
    except Exception as exc:  # onnxruntime's own exception types (InvalidGraph, Fail, RuntimeException, ...)
        source = getattr(model, "source", None)
        raise CarveError(
            f"{source or what}: ONNX Runtime cannot run it ({first_line(exc)})",
            hint="check that the model runs in ONNX Runtime as it is",
        ) from None


def check_runs(model, *, what: str = "the model") -> None:
    """The model runs in ONNX Runtime on random inputs with finite outputs (else a CarveError)."""
    from carve.pipeline.errors import CarveError

    outs = run_checked(model, random_feeds(model, batch=2), what=what)
    for o, y in zip(model.proto.graph.output if isinstance(model, Model) else model.graph.output, outs):
        if np.issubdtype(np.asarray(y).dtype, np.floating) and not np.isfinite(y).all():
            raise CarveError(
                f"{getattr(model, 'source', None) or what}: output {o.name!r} holds NaN or Inf on random inputs"
            )
