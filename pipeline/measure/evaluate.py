"""Accuracy on labelled data and agreement with a reference model: what ``carve eval`` reports.

Top-1 / top-5 need labels; a detection set (boxes) gets mAP instead (:mod:`carve.pipeline.measure.detection`).
Agreement with a reference (usually the unpruned model) needs none: the fraction of inputs where both predict the
same class, and the mean KL divergence KL(reference || model) of their softmax outputs.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.capture import predict
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model
from carve.pipeline.graph.shapes import concrete_input_shapes


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def topk(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def agreement(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    p, q = softmax(reference.astype(np.float64)), softmax(logits.astype(np.float64))
    kl = (p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None)))).sum(axis=1)
    return {"top1_agreement": float((reference.argmax(1) == logits.argmax(1)).mean()), "kl_mean": float(kl.mean())}


def same_input(model: Model, reference: Model, *, purpose: str = "agreement") -> None:
    """Agreement (and distillation) compares outputs on the same inputs: the two models must take the same input
    (batch aside)."""

    def dims(m: Model) -> list[tuple]:
        return [tuple(s[1:]) for s, _ in concrete_input_shapes(m.proto, 1).values()]

    a, b = dims(model), dims(reference)
    if a != b:
        show = lambda d: ", ".join("x".join(map(str, s)) for s in d)  # noqa: E731
        raise CarveError(
            f"{reference.source or 'the reference'}: takes input {show(b)}, but {model.source or 'the model'} takes "
            f"{show(a)}; {purpose} needs two models with the same input",
            hint="compare a model with its own pruned / decomposed version",
        )


def evaluate(model: Model, data: Dataset, *, reference: Model | None = None, threads: int = 2, progress=None) -> dict:
    """The ``accuracy`` report section for ``model`` on ``data``; ``progress`` hears ``evaluate: images`` (and
    ``evaluate reference: images``) done of the total."""
    if reference is not None:
        same_input(model, reference)
    if data.boxes is not None:  # a detection set: mAP against its boxes, for the model and the reference
        from carve.pipeline.measure.detection import evaluate_detection

        out = {
            "data": data.describe(),
            "samples": len(data),
            "detection": evaluate_detection(model, data, threads=threads),
        }
        if reference is not None:
            ref = {"source": str(reference.source) if reference.source else None}
            out["reference"] = {**ref, "detection": evaluate_detection(reference, data, threads=threads)}
        return out
    logits = predict(model, data, threads=threads, progress=progress, stage="evaluate: images")
    if logits.ndim != 2:
        logits = logits.reshape(len(logits), -1)
    out: dict = {"data": data.describe(), "samples": int(len(logits))}
    if data.labels is not None:
        labels = data.labels[data._idx()]
        out["top1"] = topk(logits, labels, 1)
        out["top5"] = topk(logits, labels, 5)
    if reference is not None:
        ref = predict(reference, data, threads=threads, progress=progress, stage="evaluate reference: images")
        ref = ref.reshape(len(logits), -1)
        out["reference"] = {"source": str(reference.source) if reference.source else None, **agreement(ref, logits)}
        if data.labels is not None:
            out["reference"]["top1"] = topk(ref, data.labels[data._idx()], 1)
    return out
