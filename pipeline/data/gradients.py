"""Loss gradients with respect to the ONNX initializers, on labelled calibration data.

The model runs in PyTorch (:class:`carve.pipeline.runtime.torch_graph.TorchGraph`, inference semantics: BN uses its
running statistics); the cross-entropy of its first output against the labels is back-propagated batch by batch, and
only running means over mini-batches are kept, per weight: E[g], E[|g|] (first-order terms: a converged model's gradient
averaged over many batches is close to zero, so importance uses the per-batch magnitude) and E[g^2] (Fisher / OBD).
``per_batch`` receives every batch's gradients for statistics of other shapes (e.g. Taylor's per-filter sums). Memory
holds a few copies of the weights, whatever the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carve.pipeline.data.batching import model_batches
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model


def check_labels(data: Dataset, labels: np.ndarray, classes: int) -> None:
    """Labels are class indices of the model's output: 0 <= label < classes (a CarveError naming the data)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise CarveError(
            f"{data.name}: labels range from {int(labels.min())} to {int(labels.max())}, but the model's first output "
            f"has {classes} classes",
            hint="give data labelled for this model's classes",
        )


@dataclass
class Gradients:
    mean: dict[str, np.ndarray]  # E[dL/dw] over batches
    abs: dict[str, np.ndarray]  # E[|dL/dw|] over batches
    sq: dict[str, np.ndarray]  # E[(dL/dw)^2] over batches
    loss: float
    samples: int


def weight_gradients(
    model: Model,
    data: Dataset,
    *,
    names: list[str] | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    per_batch=None,
) -> Gradients:
    """Mean gradient and mean squared gradient of the cross-entropy for the initializers ``names`` (default: all
    trainable ones)."""
    import torch  # here, not at import: loading torch costs seconds and most commands never need it
    import torch.nn.functional as F

    from carve.pipeline.runtime.torch_graph import TorchGraph

    if data.labels is None:
        raise CarveError(f"gradients of the loss need labelled data; {data.name} has no labels")
    tg = TorchGraph(model).eval()
    names = names or list(tg.param_of)
    params = {n: tg.parameter(n) for n in names if n in tg.param_of and tg.parameter(n).requires_grad}
    mean = {n: torch.zeros_like(p) for n, p in params.items()}
    absm = {n: torch.zeros_like(p) for n, p in params.items()}
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    total_loss, batches, samples = 0.0, 0, 0
    try:
        for x, y, _ in model_batches(model, data, batch_size):
            tg.zero_grad(set_to_none=True)
            out = tg(torch.from_numpy(x))
            logits = out[0] if isinstance(out, tuple) else out
            check_labels(data, y, logits.reshape(len(x), -1).shape[1])
            loss = F.cross_entropy(logits.reshape(len(x), -1), torch.from_numpy(y))
            loss.backward()
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:
                        mean[n] += p.grad
                        absm[n] += p.grad.abs()
                        sq[n] += p.grad * p.grad
                if per_batch is not None:
                    per_batch({n: p.grad.numpy() for n, p in params.items() if p.grad is not None})
            total_loss += float(loss.detach()) * len(x)
            batches += 1
            samples += len(x)
    finally:
        torch.set_num_threads(old_threads)

    def avg(d):
        return {n: (v / max(batches, 1)).numpy() for n, v in d.items()}

    return Gradients(avg(mean), avg(absm), avg(sq), total_loss / max(samples, 1), samples)
