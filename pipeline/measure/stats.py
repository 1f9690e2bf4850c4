"""Latency statistics: per-run summaries and the bootstrap confidence interval of a median (of per-round speed-up
ratios)."""

from __future__ import annotations

import numpy as np


def latency_stats(times: np.ndarray, batch: int) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64)
    med = float(np.median(t))
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if len(t) > 1 else 0.0
    return {
        "median_ms": med * 1e3,
        "p90_ms": float(np.percentile(t, 90)) * 1e3,
        "p99_ms": float(np.percentile(t, 99)) * 1e3,
        "mean_ms": mean * 1e3,
        "std_ms": std * 1e3,
        "cv": std / mean if mean > 0 else 0.0,
        "throughput": batch / med if med > 0 else 0.0,
        "runs": int(len(t)),
    }


def bootstrap_median_ci(
    values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(median, low, high): percentile bootstrap confidence interval of the median."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("no values")
    med = float(np.median(v))
    if len(v) == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    meds = np.median(v[idx], axis=1)
    alpha = (1 - confidence) / 2
    return med, float(np.quantile(meds, alpha)), float(np.quantile(meds, 1 - alpha))
