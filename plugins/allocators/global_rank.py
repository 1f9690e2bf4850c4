"""Global allocation: rank every prunable unit of the model on one scale and remove the lowest ``ratio`` of them.

Scores of different layers are not comparable as they are (a 3x3x256 filter's L1 norm dwarfs a 1x1x16 one's), so each
group's scores are first normalised (``norm``: divided by the group's mean prunable score, the default; by its max; or
replaced by their rank within the group). Each slice then keeps at least ``keep_min`` units and an aligned width (the
highest-scored candidates are spared first to reach the next multiple of ``round_to``).
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.allocator import Allocation, Allocator, aligned_removal, allocators, remove_lowest
from carve.pipeline.pruning.scoring import normalised


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
