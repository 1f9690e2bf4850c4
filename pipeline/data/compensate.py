"""Compensation on calibration data: the machinery behind least-squares refits, bias correction and BN
re-estimation (``plugins/repairs/``).

Compensating a layer changes what every later layer sees, so a target must be fitted on inputs that carry every
upstream repair. Two runners give the same fixed point:

* :func:`run_stream` (the default) walks each model **once**, in topological order, over the calibration batches
  preprocessed once. Each model is cut into segments at the targets and every segment runs through a small ONNX
  Runtime session built when it runs, so it sees the weights as they are then; only the live tensors (the frontier)
  are kept. When the walk reaches an unrepaired target, every unrepaired target whose inputs are available is
  repaired (they depend only on nodes that ran with their final weights), then the walk goes on. The original model
  is a second stream that may run ahead (what the targets need of it stays pinned until they are repaired); a job
  that does not read it (BN re-estimation) skips it.
* :func:`run_levels` processes *levels* (a node's level is the number of targets upstream of it) and runs both models
  from the input for every level: L levels cost ~L/2 forward passes per model. It is the fallback when the stream's
  frontier would not fit the memory budget (large inputs times many samples) and the reference the tests compare with.

What the stream gained over the level runner, and why the small BLAS products of the repairs run single-threaded
(``threadpoolctl``; multi-threaded OpenBLAS/OpenMP collapses on shared cores), is measured in docs/passes.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.data.batching import model_batches
from carve.pipeline.data.capture import with_outputs
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model
from carve.pipeline.graph.model import itemsize, outer_names
from carve.pipeline.progress import Progress
from carve.pipeline.runtime.ort import session

STREAM_MEMORY_BUDGET = 2 << 30  # bytes of live activations the stream may hold for all batches (both models)


class Work(Protocol):
    """A compensation job. Per target node and batch, ``observe`` sees the original model's tensors (when
    ``needs_original``), then ``accumulate`` the working model's tensors of the same batch; ``finish`` writes the
    node's new parameters into the working model and returns a line for the report."""

    needs_original: bool

    def tensors(self, node: onnx.NodeProto) -> list[str]:
        """Tensors the node needs from the working model (usually its input)."""

    def original_tensors(self, node: onnx.NodeProto) -> list[str]:
        """Tensors the node needs from the original model (its input, or its output when that gives the targets)."""

    def observe(self, node: onnx.NodeProto, batch: int, original: dict[str, np.ndarray]) -> None: ...

    def accumulate(self, node: onnx.NodeProto, batch: int, working: dict[str, np.ndarray]) -> None: ...

    def finish(self, node: onnx.NodeProto, model: Model) -> str | None: ...


def compensate(
    original: Model,
    working: Model,
    targets: Iterable[str],
    work: Work,
    data: Dataset,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    stage: str = "compensate: layer",
    memory_budget: int | None = None,
) -> list[str]:
    """Compensate ``targets`` in ``working``: streamed when its frontier fits ``memory_budget`` (default
    :data:`STREAM_MEMORY_BUDGET`), else level by level. Returns the report lines. ``progress`` hears ``stage`` with
    the targets done so far of all."""
    targets = list(targets)
    budget = STREAM_MEMORY_BUDGET if memory_budget is None else memory_budget
    runner = run_stream if stream_bytes(working, len(data), work.needs_original) <= budget else run_levels
    with _single_threaded_blas():
        return runner(original, working, targets, work, data, batch_size=batch_size, progress=progress, stage=stage)


@contextlib.contextmanager
def _single_threaded_blas():
    from threadpoolctl import threadpool_limits

    # the Gram products are tall-skinny GEMMs of a few ms each: multi-threaded BLAS is slower on them, and collapses
    # when the other core is busy (docs/passes.md)
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# streamed: one pass per model


def _reads(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + list(outer_names(node))


def _last_use(model: Model) -> dict[str, int]:
    """The index of the last node that reads each tensor (graph outputs: past the end)."""
    nodes = list(model.graph.node)
    last: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for i in _reads(n):
            last[i] = k
    for o in model.output_names:
        last[o] = len(nodes)
    return last


def stream_bytes(model: Model, samples: int, both: bool = True) -> int:
    """An estimate of the stream's peak memory: the largest set of tensors alive at once, for all samples (twice when
    both models stream). Tensors of unknown shape count as the largest known activation."""
    nodes = list(model.graph.node)
    last = _last_use(model)
    size: dict[str, int] = {}
    for name in [*model.input_names, *(o for n in nodes for o in n.output if o)]:
        shp = model.shape(name)
        if shp is not None and all(d is not None for d in shp[1:]):
            size[name] = int(np.prod(shp[1:], dtype=np.int64)) * (itemsize(model.dtype(name) or 1) or 4)
    fallback = max(size.values(), default=0)
    live = sum(size.get(i, fallback) for i in model.input_names)
    peak = live
    for k, n in enumerate(nodes):
        live += sum(size.get(o, fallback) for o in n.output if o and last.get(o, -1) > k)
        peak = max(peak, live)
        live -= sum(size.get(i, fallback) for i in set(_reads(n)) if last.get(i) == k and not model.is_const(i))
    return peak * samples * (2 if both else 1)


class _Stream:
    """One model executed segment by segment over preprocessed batches, keeping only the live tensors.

    ``advance(stop)`` runs nodes[pos:stop] for every batch through one small ONNX Runtime session holding just those
    nodes and the initializers they read, built when the segment runs (so a repair of its first nodes is in it), and
    drops the tensors nothing at or after ``stop`` reads.
    """

    def __init__(self, model: Model, batches: list[np.ndarray]) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        if len(model.input_names) != 1:
            raise CarveError(f"compensation streams models with one input; this one has {model.input_names}")
        self.env: dict[str, list[np.ndarray]] = {model.input_names[0]: batches}
        self.pinned: set[str] = set()  # kept whatever their last use (a job has yet to see them)
        self.pos = 0
        self.last_use = _last_use(model)

    def advance(self, stop: int) -> None:
        if stop <= self.pos:
            return
        seg = self.nodes[self.pos : stop]
        produced = {o for n in seg for o in n.output if o}
        reads = list(dict.fromkeys(i for n in seg for i in _reads(n) if i not in produced))
        inputs = [i for i in reads if i in self.env]
        consts = [i for i in reads if i not in self.env and self.model.is_const(i)]
        missing = [i for i in reads if i not in self.env and not self.model.is_const(i)]
        if missing:
            raise CarveError(f"compensation: tensor {missing[0]!r} is neither an activation nor a constant")
        outputs = [o for o in produced if self.last_use.get(o, -1) >= stop or o in self.pinned]
        if outputs:
            sess = _segment_session(self.model, seg, inputs, consts, outputs)
            n_batches = len(next(iter(self.env.values())))
            results: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
            for b in range(n_batches):
                for o, v in zip(outputs, sess.run(outputs, {i: self.env[i][b] for i in inputs})):
                    results[o].append(v)
            self.env.update(results)
        self.pos = stop
        self.drop()

    def drop(self) -> None:
        for name in [t for t in self.env if self.last_use.get(t, -1) < self.pos and t not in self.pinned]:
            del self.env[name]

    def tensors(self, names: list[str], batch: int) -> dict[str, np.ndarray]:
        return {n: self.env[n][batch] for n in names}


def _segment_session(model: Model, seg: list[onnx.NodeProto], inputs: list[str], consts: list[str], outputs):
    def value_info(name: str):
        return helper.make_tensor_value_info(name, model.dtype(name) or onnx.TensorProto.FLOAT, None)

    graph = helper.make_graph(
        seg,
        "segment",
        [value_info(i) for i in inputs],
        [value_info(o) for o in outputs],
        initializer=[model.init[c] for c in consts],
    )
    proto = helper.make_model(graph, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    proto.functions.extend(model.proto.functions)
    return session(proto, threads=1)  # one thread: measured faster than two on shared cores for these segments


def run_stream(
    original: Model,
    working: Model,
    targets: list[str],
    work: Work,
    data: Dataset,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    stage: str = "compensate: layer",
) -> list[str]:
    """Compensate ``targets`` in ``working`` in one streamed pass of each model (see the module docstring)."""
    nodes = list(working.graph.node)
    if work.needs_original and [n.name for n in original.graph.node] != [n.name for n in nodes]:
        raise CarveError("compensation: the original and working models differ in structure")
    index = {n.name: k for k, n in enumerate(nodes)}
    target_set = set(targets)
    todo = [n for n in nodes if n.name in target_set]
    # preprocessed once, shared by both models; in chunks of a static batch when the model has one
    batches = [x for x, _, _ in model_batches(working, data, batch_size)]
    wstream = _Stream(working, batches)
    ostream, from_original = _original_stream(original, batches, todo, work)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    details: list[str] = []
    done: set[str] = set()
    while len(done) < len(todo):
        nxt = next(n for n in todo if n.name not in done)
        stop = index[nxt.name]
        wstream.advance(stop)
        ready = [n for n in todo if n.name not in done and all(t in wstream.env for t in work.tensors(n))]
        if nxt not in ready:
            raise CarveError(f"compensation: the inputs of {nxt.name!r} are not activations of the model")
        if ostream is not None:
            ostream.advance(
                max([stop] + [producer[t] + 1 for n in ready for t in from_original[n.name] if t in producer])
            )
        details += _compensate_ready(ready, work, working, wstream, ostream, from_original, len(batches))
        done.update(n.name for n in ready)
        if progress:
            progress(stage, len(done), len(todo))
    return details


def _original_stream(
    original: Model, batches: list[np.ndarray], todo: list[onnx.NodeProto], work: Work
) -> tuple[_Stream | None, dict[str, list[str]]]:
    """The original model's stream (None when the job does not read it) with the tensors each target needs of it
    pinned, and those tensors per target."""
    if not work.needs_original:
        return None, {}
    stream = _Stream(original, batches)
    from_original = {n.name: work.original_tensors(n) for n in todo}
    stream.pinned = {t for names in from_original.values() for t in names}
    return stream, from_original


def _compensate_ready(
    ready: list[onnx.NodeProto],
    work: Work,
    working: Model,
    wstream: _Stream,
    ostream: _Stream | None,
    from_original: dict[str, list[str]],
    n_batches: int,
) -> list[str]:
    """Feed every batch of the ready targets to ``work``, then finish them (their new parameters go into ``working``)
    and unpin what the original stream kept for them. Returns the report lines."""
    for b in range(n_batches):
        for n in ready:
            if ostream is not None:
                work.observe(n, b, ostream.tensors(from_original[n.name], b))
            work.accumulate(n, b, wstream.tensors(work.tensors(n), b))
    lines = [line for n in ready if (line := work.finish(n, working))]
    if ostream is not None:
        for n in ready:
            ostream.pinned.difference_update(from_original[n.name])
        ostream.drop()
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# level by level: both models from the input for every level


def levels(model: Model, targets: Iterable[str]) -> list[list[onnx.NodeProto]]:
    """Group the target nodes so that no node depends on a target of its own or a later group."""
    targets = set(targets)
    depth: dict[str, int] = {}
    by_level: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        d = max((depth.get(i, 0) for i in node.input if i), default=0)
        if node.name in targets:
            by_level.setdefault(d, []).append(node)
            d += 1
        for o in node.output:
            depth[o] = d
    return [by_level[k] for k in sorted(by_level)]


def run_levels(
    original: Model,
    working: Model,
    targets: list[str],
    work: Work,
    data: Dataset,
    *,
    batch_size: int = 64,
    progress: Progress | None = None,
    stage: str = "compensate: layer",
) -> list[str]:
    """Compensate ``targets`` in ``working`` level by level (see the module docstring). Returns the report lines."""
    groups = levels(working, targets)
    total = sum(len(g) for g in groups)
    details: list[str] = []
    x_name = working.input_names[0]
    done = 0
    for group in groups:
        # sessions truncated to this level's tensors: early levels run only the start of the network
        work_names = sorted({t for n in group for t in work.tensors(n)})
        orig_names = sorted({t for n in group for t in work.original_tensors(n)}) if work.needs_original else []
        work_sess = session(with_outputs(working, work_names, only=True), threads=1)
        orig_sess = session(with_outputs(original, orig_names, only=True), threads=1) if orig_names else None
        for b, (x, _, _) in enumerate(model_batches(working, data, batch_size)):
            orig = dict(zip(orig_names, orig_sess.run(orig_names, {x_name: x}))) if orig_sess else {}
            cur = dict(zip(work_names, work_sess.run(work_names, {x_name: x})))
            for n in group:
                if orig_sess is not None:
                    work.observe(n, b, {t: orig[t] for t in work.original_tensors(n)})
                work.accumulate(n, b, {t: cur[t] for t in work.tensors(n)})
        for n in group:
            line = work.finish(n, working)
            if line:
                details.append(line)
        done += len(group)
        if progress:
            progress(stage, done, total)
    return details
