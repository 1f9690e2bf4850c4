"""Comparing two models' outputs in ONNX Runtime: the metrics (one definition for pass errors, bench agreement and
verification) and the check that a result equals its reference."""

from __future__ import annotations

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.runtime.ort import random_feeds, run, run_checked


def output_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How far ``candidate`` is from ``reference`` (same shape): max |diff|, the same relative to the reference's
    scale, cosine similarity, and for (N, classes) logits the top-1 agreement."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(candidate, dtype=np.float64)
    diff = float(np.abs(x - y).max(initial=0))
    scale = float(np.abs(x).max(initial=0))
    out = {
        "max_abs": diff,
        "max_rel": diff / max(scale, 1e-12),
        "cosine": float((x * y).sum() / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30)),
    }
    if x.ndim == 2 and x.shape[1] > 1:
        out["top1_agreement"] = float((x.argmax(1) == y.argmax(1)).mean())
    return out


def compare_outputs(reference, candidate, *, seed: int = 0, batch: int = 2) -> dict[str, float]:
    """How far ``candidate`` is from ``reference`` over all their floating-point outputs on one random batch (the
    same inputs :func:`verify_equal` uses): the largest |diff|, the same relative to the reference's scale, and the
    lowest cosine similarity (and top-1 agreement when the first output is (N, classes) logits)."""
    feeds = random_feeds(reference, batch=batch, seed=seed)
    a, b = run(reference, feeds), run(candidate, feeds)
    out = {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    scale = 0.0
    for k, (x, y) in enumerate(zip(a, b)):
        if not np.issubdtype(x.dtype, np.floating) or x.shape != y.shape:
            continue
        m = output_metrics(x, y)
        out["max_abs"] = max(out["max_abs"], m["max_abs"])
        out["cosine"] = min(out["cosine"], m["cosine"])
        scale = max(scale, float(np.abs(x).max(initial=0)))
        if k == 0 and "top1_agreement" in m:
            out["top1_agreement"] = m["top1_agreement"]
    out["max_rel"] = out["max_abs"] / max(scale, 1e-12)
    return out


# Below this output scale (inputs are standard normal) a comparison proves nothing: any two models "agree".
MIN_SCALE = 1e-6


def nonfinite_outputs(outputs: list[np.ndarray]) -> list[int]:
    """Indices of the floating-point outputs that hold NaN or Inf."""
    return [k for k, y in enumerate(outputs) if np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all()]


def verify_equal(reference, candidate, *, seed: int = 0, batch: int = 2, rtol: float = 1e-4) -> dict:
    """Run both on the same random batch; every output must agree relative to the output scale (else CarveError).

    Refused as well, because the statement would be hollow: NaN or Inf in either model's outputs (NaN compares
    false with everything, so it would otherwise "pass"), and reference outputs that are all ~0 (below
    :data:`MIN_SCALE`: a degenerate model agrees with anything)."""
    feeds = random_feeds(reference, batch=batch, seed=seed)
    a = run_checked(reference, feeds, what="the reference")  # the user's model, weights changed: its failure is theirs
    b = run(candidate, feeds)
    for what, outs, model in (("reference", a, reference), ("result", b, candidate)):
        bad = nonfinite_outputs(outs)
        if bad:
            name = _output_name(model, bad[0])
            raise CarveError(
                f"verification failed: the {what}'s output {name!r} holds NaN or Inf on random inputs",
                hint="check the model's weights and the calibration data for NaN/Inf (and a refit's ridge)",
            )
    worst, scale, compared = 0.0, 0.0, 0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise CarveError(f"output shape changed: {x.shape} -> {y.shape}; please report this model")
        if np.issubdtype(x.dtype, np.floating):
            m = output_metrics(x, y)
            worst = max(worst, m["max_abs"])
            scale = max(scale, float(np.abs(x).max(initial=0)))
            compared += 1
        elif not np.array_equal(x, y):
            raise CarveError(
                f"verification failed: a non-float output differs ({int((x != y).sum())} of {x.size} values)",
                hint="`verify=false` skips the check",
            )
    if compared and scale < MIN_SCALE:
        raise CarveError(
            f"verification proves nothing: the reference's outputs are all ~0 (largest |y| {scale:.3g}) on random "
            "inputs, so any model would agree with it",
            hint="are the weights degenerate (scaled to ~0)? `verify=false` writes the result unverified",
        )
    if not worst <= rtol * scale + 1e-6 * min(scale, 1.0):
        raise CarveError(
            f"verification failed: the result differs from its reference by {worst:.3g} (output scale {scale:.3g}); "
            "please report this model",
            hint="`verify=false` skips the check",
        )
    return {"max_abs_diff": worst, "scale": scale}


def _output_name(model, k: int) -> str:
    proto = getattr(model, "proto", model)
    try:
        return proto.graph.output[k].name
    except (AttributeError, IndexError):
        return str(k)
