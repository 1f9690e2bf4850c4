"""Uniform allocation: every slice of every group loses the same fraction of its units, lowest scores first.

The kept width is rounded up to a multiple of ``round_to`` (kernels run fastest on aligned widths) and is at least
``keep_min``; frozen units are kept and counted in the width. If too few units are prunable to reach an aligned width,
fewer are removed so the width stays aligned.
"""

from __future__ import annotations

import numpy as np

from pipeline.graph.channels import ChannelAnalysis
from pipeline.pruning.allocator import allocators, remove_by_rate


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
    rates = np.full(len(analysis.groups), ratio)
    return remove_by_rate(analysis, scores, frozen, rates, round_to=round_to, keep_min=keep_min)
