"""Uniform allocation: every slice of every group loses the same fraction of its units, lowest scores first.

The kept width is rounded to the nearest multiple of ``round_to`` (kernels run fastest on aligned widths) and is at
least ``keep_min``; frozen units are kept and counted in the width. If too few units are prunable to reach an aligned
width, fewer are removed so the width stays aligned.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.allocator import Allocation, Allocator, allocators, remove_by_rate


@allocators.register("uniform")
class Uniform(Allocator):
    description = "the same fraction of every slice of every group, lowest scores first"

    def allocate(self, job: Allocation) -> np.ndarray:
        return remove_by_rate(job, np.full(len(job.analysis.groups), job.ratio))
