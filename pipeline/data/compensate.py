"""Level-by-level compensation on calibration data: the machinery behind least-squares refits, bias correction and
BN re-estimation.

Compensating a layer changes what every later layer sees, so layers are processed in *levels*: a node's level is the
number of compensated nodes upstream of its input. All nodes of one level are independent of each other, so one pass
over the calibration data serves them all: the original model and the working model (the one being compensated) run on
the same batches, every node of the level receives its input from both (``update(node, original, working)``), and
after the pass the level's changes are written into the working model before the next level is captured. A chain of
L layers costs L passes; a wide network costs fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import onnx

from pipeline.data.capture import with_outputs
from pipeline.data.datasets import Dataset
from pipeline.graph import Model
from pipeline.runtime.ort import session


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


class LevelWork(Protocol):
    def tensors(self, node: onnx.NodeProto) -> list[str]:
        """Tensors this node needs from both models (usually its input)."""

    def update(self, node: onnx.NodeProto, original: dict[str, np.ndarray], working: dict[str, np.ndarray]) -> None:
        """Accumulate statistics from one batch."""

    def finish(self, node: onnx.NodeProto, model: Model) -> str | None:
        """Write the node's new parameters into the working model; return a line for the report."""


def run_levels(
    original: Model,
    working: Model,
    targets: Iterable[str],
    work: LevelWork,
    data: Dataset,
    *,
    batch_size: int = 64,
    threads: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Compensate ``targets`` in ``working`` level by level. Returns the report lines."""
    groups = levels(working, targets)
    details: list[str] = []
    x_name = original.input_names[0]
    for k, group in enumerate(groups):
        names = sorted({t for n in group for t in work.tensors(n)})
        # sessions truncated to this level's tensors: early levels run only the start of the network
        orig_sess = session(with_outputs(original, names, only=True), threads=threads)
        work_sess = session(with_outputs(working, names, only=True), threads=threads)
        for x, _ in data.batches(batch_size):
            orig = dict(zip(names, orig_sess.run(names, {x_name: x})))
            cur = dict(zip(names, work_sess.run(names, {x_name: x})))
            for n in group:
                work.update(n, orig, cur)
        for n in group:
            line = work.finish(n, working)
            if line:
                details.append(line)
        if progress:
            progress(k + 1, len(groups))
    return details
