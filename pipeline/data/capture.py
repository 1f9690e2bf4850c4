"""Capturing intermediate tensors through ONNX Runtime, and the running statistics kept of them.

:func:`capture` exposes intermediate tensors as extra outputs of a copy of the model and runs ONNX Runtime over the
batches, handing every batch to *reducers* that keep running statistics: memory stays at the size of the statistics,
whatever the number of samples. :class:`ChannelMoments` is the usual reducer: per-channel count, mean and variance,
merged batch by batch with the numerically stable parallel update (Chan, Golub and LeVeque 1979), not E[x^2] - E[x]^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.data.batching import model_batches
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.progress import Progress
from carve.pipeline.runtime.ort import session


class Reducer(Protocol):
    """Receives each batch of a captured tensor; keeps only running statistics.

    A reducer that needs several tensors of the same batch together defines ``update_batch(values, labels)``
    (``values``: tensor name -> array) instead of ``update``.
    """

    def update(self, name: str, value: np.ndarray, labels: np.ndarray | None) -> None: ...


@dataclass
class ChannelMoments:
    """Per-channel count, mean and variance of captured tensors (channel axis 1, or the one ``axes`` names for a
    tensor, e.g. -1 for a MatMul's ``[N, T, C]`` input), merged batch by batch.

    Each batch's mean and sum of squared deviations (M2) are merged into the running ones with the parallel update
    of Chan, Golub and LeVeque: stable even where the mean is large against the spread, which E[x^2] - E[x]^2 is not.
    """

    count: dict[str, int] = field(default_factory=dict)
    means: dict[str, np.ndarray] = field(default_factory=dict)
    m2: dict[str, np.ndarray] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)

    def update(self, name: str, value: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Merge a batch with its channels on axis 1 (N x C x ...) or on the tensor's axis in ``axes``."""
        axis = self.axes.get(name, 1) % value.ndim
        if axis != 1:
            value = np.moveaxis(value, axis, 1)
        axes = (0, *range(2, value.ndim))
        n_b = value.size // value.shape[1]
        if n_b == 0:
            return
        mean_b = value.mean(axis=axes, dtype=np.float64)
        # centred in the batch's dtype on the rounded mean, squares summed in float64, the rounding offset removed
        # exactly: the same M2 as a float64 copy to ~1e-9, three times cheaper
        d = value - mean_b.astype(value.dtype).reshape(1, -1, *([1] * (value.ndim - 2)))
        offset = d.mean(axis=axes, dtype=np.float64)
        m2_b = np.square(d, out=d).sum(axis=axes, dtype=np.float64) - n_b * offset**2
        self.merge(name, n_b, mean_b, m2_b)

    def merge(self, name: str, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        """Merge a block's count, mean and sum of squared deviations (Chan, Golub and LeVeque)."""
        n_a = self.count.get(name, 0)
        if n_a == 0:
            self.count[name], self.means[name], self.m2[name] = n_b, mean_b, m2_b
            return
        n = n_a + n_b
        delta = mean_b - self.means[name]
        self.means[name] = self.means[name] + delta * (n_b / n)
        self.m2[name] = self.m2[name] + m2_b + delta**2 * (n_a * n_b / n)
        self.count[name] = n

    def mean(self, name: str) -> np.ndarray:
        return self.means[name]

    def var(self, name: str) -> np.ndarray:
        """Population variance (what BatchNormalization's running variance estimates)."""
        return self.m2[name] / self.count[name]

    def second_moment(self, name: str) -> np.ndarray:
        """E[x^2] per channel."""
        return self.var(name) + self.means[name] ** 2


def with_outputs(model: Model, names: list[str], *, only: bool = False) -> onnx.ModelProto:
    """A copy of the model that also outputs the tensors ``names`` (``only``: nothing else, so ONNX Runtime drops the
    nodes those tensors do not depend on and runs just the part of the graph that produces them)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    if only:
        del proto.graph.output[:]
    existing = {o.name for o in proto.graph.output}
    for n in names:
        if n in existing:
            continue
        if n not in model.producer and n not in model.input_names:
            raise CarveError(f"cannot capture {n!r}: no node produces it")
        dtype = model.dtype(n) or onnx.TensorProto.FLOAT
        proto.graph.output.append(helper.make_tensor_value_info(n, dtype, None))
    return proto


def capture(
    model: Model,
    names: list[str],
    data: Dataset,
    reducers: list[Reducer] | Reducer,
    *,
    batch_size: int = 64,
    threads: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Run the model over ``data`` and feed every batch of the tensors ``names`` to the reducers; ``progress`` hears
    ``capture: images`` with the count so far."""

    reducers = reducers if isinstance(reducers, list) else [reducers]
    proto = with_outputs(model, names)
    sess = session(proto, threads=threads or 2)
    input_name = model.input_names[0]
    seen = 0
    for x, y, _ in model_batches(model, data, batch_size):
        outs = dict(zip(names, sess.run(names, {input_name: x})))
        for r in reducers:
            if hasattr(r, "update_batch"):
                r.update_batch(outs, y)
            else:
                for n, v in outs.items():
                    r.update(n, v, y)
        seen += len(x)
        if progress:
            progress("capture: images", seen, len(data))


def predict(
    model: Model | onnx.ModelProto,
    data: Dataset,
    *,
    batch_size: int = 128,
    threads: int | None = None,
    progress=None,
    stage: str = "predict: images",
) -> np.ndarray:
    """The model's first output over the whole dataset (N x classes); a static-batch model runs in chunks of its
    batch, the last one padded and cut back (:mod:`carve.pipeline.data.batching`). ``progress`` hears ``stage`` with
    the images done of ``len(data)``."""

    sess = session(model, threads=threads or 2)
    name = sess.get_inputs()[0].name
    outs, done = [], 0
    for x, _, n in model_batches(model, data, batch_size, pad_last=True):
        outs.append(sess.run(None, {name: x})[0][:n])
        done += n
        if progress is not None:
            progress(stage, done, len(data))
    return np.concatenate(outs)
