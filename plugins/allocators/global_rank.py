"""Global allocation: rank every prunable unit of the model on one scale and remove the lowest ``ratio`` of them.

Scores of different layers are not comparable as they are (a 3x3x256 filter's L1 norm dwarfs a 1x1x16 one's), so each
group's scores are first normalised (``norm``: divided by the group's mean prunable score, the default; by its max; or
replaced by their rank within the group). Each slice then keeps at least ``keep_min`` units and an aligned width (the
highest-scored candidates are spared first to reach the next multiple of ``round_to``).
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.pruning.allocator import Allocation, Allocator, aligned_removal, allocators, remove_lowest


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


@allocators.register("global")
class GlobalRank(Allocator):
    description = "one ranking of normalised scores across all groups; the lowest `ratio` of units go"
    options = {"norm": "mean"}

    def allocate(self, job: Allocation) -> np.ndarray:
        an = job.analysis
        s = normalised(an, job.scores, job.frozen, self.opts["norm"])
        prunable = np.flatnonzero(~job.frozen)
        removed = np.zeros(an.n_units, dtype=bool)
        n_remove = int(round(job.ratio * len(prunable)))
        if n_remove <= 0:
            return removed
        candidate = np.zeros(an.n_units, dtype=bool)
        candidate[prunable[np.argsort(s[prunable], kind="stable")[:n_remove]]] = True
        for g in an.groups:
            for j, sl in enumerate(g.slices):
                cand = sl[candidate[sl]]
                n = len(sl)
                k = aligned_removal(n, min(len(cand), n - min(n, job.keep_min)), g.round_to(j, job.round_to))
                remove_lowest(removed, cand, s, k)
        return removed
