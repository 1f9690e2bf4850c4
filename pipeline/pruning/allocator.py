"""The allocator interface and its registry: how many units each slice of each group loses.

An allocator is a function ``(analysis, scores, frozen, *, ratio, round_to, keep_min, **options) -> removed`` (a
boolean mask over units; see :class:`Allocator`). Built-ins live in ``plugins/allocators/``; third parties register
through the ``carve.allocators`` entry-point group. The helpers here are what every allocator needs: the aligned kept
width of a slice and the removal of its lowest-scored prunable units.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from pipeline.graph.channels import ChannelAnalysis
from pipeline.registry import Registry

allocators: Registry = Registry(
    "allocator", entry_point_group="carve.allocators", builtin_modules=["plugins.allocators"]
)


def kept_width(n: int, ratio: float, round_to: int = 1, keep_min: int = 1) -> int:
    """How many of ``n`` channels a slice keeps at ``ratio``: aligned up to ``round_to``, at least ``keep_min``."""
    keep = math.ceil(n * (1.0 - ratio) - 1e-9)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(n, max(keep, keep_min, 1))


class Allocator(Protocol):
    """What every allocator is: scores and frozen mask in, removed-unit mask out, for a base ``ratio``."""

    def __call__(
        self,
        analysis: ChannelAnalysis,
        scores: np.ndarray,
        frozen: np.ndarray,
        *,
        ratio: float,
        round_to: int = 1,
        keep_min: int = 1,
        **options: Any,
    ) -> np.ndarray: ...


def aligned_removal(n: int, n_remove: int, round_to: int) -> int:
    """The largest count <= ``n_remove`` that leaves a slice of ``n`` units an aligned width (or 0)."""
    while n_remove > 0 and round_to > 1 and (n - n_remove) % round_to:
        n_remove -= 1
    return max(n_remove, 0)


def remove_lowest(removed: np.ndarray, candidates: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Mark the ``k`` lowest-scored of ``candidates`` removed (ties broken by position)."""
    if k > 0:
        removed[candidates[np.argsort(scores[candidates], kind="stable")[:k]]] = True


def remove_by_rate(
    analysis: ChannelAnalysis,
    scores: np.ndarray,
    frozen: np.ndarray,
    rate_of_group: np.ndarray,
    *,
    round_to: int = 1,
    keep_min: int = 1,
) -> np.ndarray:
    """Every slice of group g loses the fraction ``rate_of_group[g]`` of its units (aligned, at least ``keep_min``
    kept, frozen units kept and counted in the width), lowest scores first."""
    removed = np.zeros(analysis.n_units, dtype=bool)
    for group in analysis.groups:
        for sl in group.slices:
            n = len(sl)
            prunable = sl[~frozen[sl]]
            n_remove = min(n - kept_width(n, float(rate_of_group[group.id]), round_to, keep_min), len(prunable))
            remove_lowest(removed, prunable, scores, aligned_removal(n, n_remove, round_to))
    return removed
