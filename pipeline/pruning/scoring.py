"""Scoring helpers that several criteria, allocators and passes share (plugins never import each other; what two of
them need lives here): a weight tensor's filters as rows, CEP's per-weight scores and grouped keep-mask (the ``cep``
criterion and the ``sparsify`` pass), scores normalised per group (the ``global`` and ``knapsack`` allocators), and
kernel dispersion (the ``simfp`` criterion and the ``dispersion`` allocator)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.gradients import Gradients
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.pruning.criterion import cosine_distances


def filter_rows(arr: np.ndarray, axis: int) -> np.ndarray:
    """A weight-shaped array as one row per filter: ``axis`` (the output channels) first, the rest flattened."""
    a = np.moveaxis(arr, axis, 0)
    return a.reshape(a.shape[0], -1)


def weight_scores(grads: Gradients, name: str, w: np.ndarray, variant: str) -> np.ndarray:
    """CEP's score of every weight of ``name`` (papers.md section 1): ``taylor`` E_batches[|g w|], ``fisher``
    0.5 w^2 E[g^2]."""
    if variant == "taylor":
        return (grads.abs[name] * np.abs(w)).astype(np.float64)
    if variant == "fisher":
        return (0.5 * w.astype(np.float64) ** 2 * grads.sq[name]).astype(np.float64)
    if variant == "delta":
        raise CarveError("cep variant delta scores whole channels (carve prune); for weights use taylor or fisher")
    raise CarveError(f"cep: unknown variant {variant!r}; valid: taylor, fisher, delta")


def weight_mask(w: np.ndarray, s: np.ndarray, axis: int, lam: float, hcep: float) -> np.ndarray:
    """Keep-mask of CEP's grouped thresholds: s_w >= lambda * mean(group), plus each group's top ``hcep``."""
    rows = filter_rows(s, axis)
    keep = rows >= lam * rows.mean(axis=1, keepdims=True)
    if hcep > 0:
        k = max(1, int(np.ceil(hcep * rows.shape[1])))
        top = np.argsort(-rows, axis=1)[:, :k]
        np.put_along_axis(keep, top, True, axis=1)
    moved = np.moveaxis(s, axis, 0).shape
    return np.moveaxis(keep.reshape(moved), 0, axis)


def layer_counts(analysis: ChannelAnalysis) -> np.ndarray:
    """Per group: how many layers' weights its channels cut (as filters or as input columns). A residual stream's
    channel passes through every block of its stage; a block's inner channel through two layers."""
    group_of = np.empty(analysis.n_units, dtype=np.int64)
    for g in analysis.groups:
        group_of[g.units] = g.id
    layers: list[set[str]] = [set() for _ in analysis.groups]
    for rec in analysis.slice_records:
        if rec.role in ("out", "in"):
            for gid in np.unique(group_of[analysis.unit_of[rec.ids]]):
                layers[int(gid)].add(rec.node)
    return np.array([max(len(s), 1) for s in layers], dtype=np.float64)


def normalised(analysis: ChannelAnalysis, scores: np.ndarray, frozen: np.ndarray, norm: str) -> np.ndarray:
    """Scores on one scale across groups: divided by the group's mean (``mean``) or max, or ranks within the group;
    ``layers``: the mean-normalised score times the number of layers the group's channels pass through (so a
    channel that many layers read and write counts for all of them, as it does in a loss-based score)."""
    if norm == "layers":
        counts = layer_counts(analysis)
        out = normalised(analysis, scores, frozen, "mean")
        for g in analysis.groups:
            out[g.units] *= counts[g.id]
        return out
    out = np.zeros_like(scores, dtype=np.float64)
    for g in analysis.groups:
        u = g.units[~frozen[g.units]]
        if not len(u):
            continue
        s = scores[u].astype(np.float64)
        if norm == "mean":
            d = float(np.abs(s).mean())
            out[u] = s / d if d > 0 else 0.0
        elif norm == "max":
            d = float(np.abs(s).max())
            out[u] = s / d if d > 0 else 0.0
        elif norm == "rank":
            out[u] = (np.argsort(np.argsort(s, kind="stable"), kind="stable") + 0.5) / len(s)
        else:
            raise CarveError(f"unknown norm {norm!r}; valid: mean, max, rank, layers")
    return out


def kernel_dispersion(w: np.ndarray) -> float:
    """Mean pairwise cosine distance of a layer's filters: low = similar kernels = redundant layer."""
    n = len(w)
    if n < 2:
        return 0.0
    d = cosine_distances(w)
    return float(d.sum() / (n * (n - 1)))
