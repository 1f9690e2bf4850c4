"""Uniform allocation: every slice of every group loses the same fraction of its units, lowest scores first.

The kept width is rounded up to a multiple of ``round_to`` (kernels run fastest on aligned widths) and is at least
``keep_min``; frozen units are kept and counted in the width. If too few units are prunable to reach an aligned width,
fewer are removed so the width stays aligned.
"""

from __future__ import annotations

import numpy as np

from pipeline.channels import ChannelAnalysis
from pipeline.planning import allocators, kept_width


@allocators.register("uniform")
def uniform(
    analysis: ChannelAnalysis,
    scores: np.ndarray,
    frozen: np.ndarray,
    *,
    ratio: float,
    round_to: int = 1,
    keep_min: int = 1,
) -> np.ndarray:
    """The same fraction of every slice of every group, lowest scores first."""
    removed = np.zeros(analysis.n_units, dtype=bool)
    for group in analysis.groups:
        for sl in group.slices:
            n = len(sl)
            prunable = sl[~frozen[sl]]
            n_remove = min(n - kept_width(n, ratio, round_to, keep_min), len(prunable))
            while n_remove > 0 and round_to > 1 and (n - n_remove) % round_to:
                n_remove -= 1
            if n_remove <= 0:
                continue
            order = prunable[np.argsort(scores[prunable], kind="stable")]
            removed[order[:n_remove]] = True
    return removed
