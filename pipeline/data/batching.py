"""Feeding data to a model at the batch it accepts.

A model exported with a static batch (``carve export --static-batch``: input ``1x3x32x32``) runs only at that batch
size. Calibration, evaluation and checks therefore run it in chunks of exactly that size: for statistics
(calibration, repairs, criteria) a last chunk that would be short is *dropped* (padding would bias the statistics)
and a warning says how many samples were used; for predictions (evaluation) the last chunk is *padded* with copies of
its last sample and the padded rows are cut from the outputs, so every sample is evaluated. A dynamic batch runs at
the requested size.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError, warn
from carve.pipeline.graph.model import Model


def static_batch(model: Model | onnx.ModelProto) -> int | None:
    """The fixed batch of the model's first input (axis 0), or None when it is dynamic."""
    proto = model.proto if isinstance(model, Model) else model
    inits = {t.name for t in proto.graph.initializer}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
        return None
    return None


def model_batches(
    model: Model | onnx.ModelProto, data: Dataset, batch_size: int = 64, *, pad_last: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray | None, int]]:
    """``(inputs, labels, real_rows)`` batches the model accepts: ``batch_size`` rows, or exactly the model's static
    batch (the short last chunk dropped, or padded when ``pad_last``; ``real_rows`` says how many rows are data)."""
    b = static_batch(model)
    if b is None:
        for x, y in data.batches(batch_size):
            yield x, y, len(x)
        return
    if len(data) < b and not pad_last:
        raise CarveError(
            f"{data.name}: {len(data)} samples, fewer than the model's static batch of {b}",
            hint=f"give at least {b} samples (`samples`), or re-export the model with a dynamic batch",
        )
    used = 0
    for x, y in data.batches(b):
        n = len(x)
        if n < b:
            if not pad_last:
                warn(
                    f"{data.name}: the model's static batch is {b}: {used} of {len(data)} samples used, the last "
                    f"{n} dropped"
                )
                return
            x = np.concatenate([x, np.repeat(x[-1:], b - n, axis=0)])
            if y is not None:
                y = np.concatenate([y, np.repeat(y[-1:], b - n, axis=0)])
        used += n
        yield x, y, n


def first_batch(model: Model | onnx.ModelProto, data: Dataset, batch_size: int = 16) -> np.ndarray:
    """One batch of inputs the model accepts (for checks on real data)."""
    for x, _, _ in model_batches(model, data, batch_size, pad_last=True):
        return x
    raise CarveError(f"{data.name}: holds no samples")
