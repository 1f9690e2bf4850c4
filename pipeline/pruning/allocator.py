"""The allocator interface and its registry: how many units each slice of each group loses.

An allocator is an :class:`Allocator`: configured by its options (``allocator_options``, e.g. ``beta=2``), asked
with an :class:`Allocation` (scores, frozen mask, alignment, and either a base ratio or a cost table and a budget) it
returns a boolean mask of removed units. An allocator declares what it needs in :attr:`Allocator.spends`:

* nothing (the default): it removes a *ratio*; a MAC, parameter or latency target is reached by the planner, which
  bisects that ratio against the target's cost (:func:`carve.pipeline.pruning.targets.bisect_ratio`);
* the target kinds it spends as a *budget* (``{"latency"}``, or ``{"latency", "macs", "params"}`` for the knapsack):
  it is then given the target's :class:`Costs` table (a latency table bound to the analysis, or the exact
  :class:`carve.pipeline.pruning.cost_table.CostTable` of MACs or parameters) and the budget (a fraction of the
  original), and never a ratio.

Built-ins live in ``plugins/allocators/``; third parties register through the ``carve.allocators`` entry-point group.
The helpers here are what every allocator needs: the aligned kept width of a slice and the removal of its
lowest-scored prunable units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.registry import Plugin, Registry

allocators: Registry = Registry(
    "allocator", entry_point_group="carve.allocators", builtin_modules=["carve.plugins.allocators"]
)


def kept_width(n: int, ratio: float, round_to: int = 1, keep_min: int = 1) -> int:
    """How many of ``n`` channels a slice keeps at ``ratio``: of the aligned widths (the multiples of ``round_to`` up
    to ``n``, and ``n`` itself) the one nearest to the asked width ``n * (1 - ratio)`` (halfway: the wider; never
    below one ``round_to``), at least ``keep_min``.

    Nearest, not up: on a narrow layer rounding up keeps far more than asked (ConvNeXt-atto's 40-channel stem at ratio
    0.5 and a multiple of 16 kept 32, 80%, and its 56x56 stage stayed the slowest part of the pruned model), so a
    ratio's widths were biased toward keeping; the nearest aligned width is as often below the asked one as above."""
    asked = n * (1.0 - ratio)
    keep = math.ceil(asked - 1e-9)
    if round_to > 1 and asked < n - 1e-9:
        below = max(round_to, math.floor(asked / round_to) * round_to)
        above = min(n, below + round_to)
        keep = above if above - asked <= asked - below + 1e-9 else below
    return min(n, max(keep, keep_min, 1))


class Costs(Protocol):
    """A cost table bound to an analysis: what a budget-spending allocator reads. :attr:`kind` says what it costs
    (``latency``: :class:`carve.pipeline.measure.latency_table.BoundTable`; ``macs`` / ``params``:
    :class:`carve.pipeline.pruning.cost_table.CostTable`)."""

    kind: str  # latency | macs | params
    error: float  # the relative error the table vouches for (0 for an exact count)
    entries: dict[int, Any]  # per tabled group: candidates (kept per slice, widest first), ``fast()`` and factors
    shares: dict[int, float]  # per tabled group: its share of the original's cost
    pairs: list[tuple[int, int, float]]  # bilinear terms between groups

    def predict(self, removed: np.ndarray) -> float:
        """Predicted cost after removing ``removed``, as a fraction of the original's."""

    def predict_factors(self, factors: dict[int, float]) -> float:
        """The same from each group's cost factor."""

    def predict_kept(self, kept: dict[int, list[int]]) -> float:
        """The same from kept units per slice of the groups given (the others whole)."""


@dataclass
class Allocation:
    """What an allocator is asked: remove units given their ``scores``, never ``frozen`` ones, keeping every slice at
    least ``keep_min`` wide and a multiple of ``round_to`` (or whole); ``criterion`` names what scored. A ratio
    allocator reads ``ratio``; a budget allocator reads ``cost`` and ``budget`` (a fraction of the original's cost)."""

    analysis: ChannelAnalysis
    scores: np.ndarray
    frozen: np.ndarray
    ratio: float = 0.0
    round_to: int = 1
    keep_min: int = 1
    criterion: str | None = None
    cost: Costs | None = None
    budget: float | None = None


class Allocator(Plugin):
    """Base class: override :meth:`allocate`; options (e.g. ``beta``) are declared in ``options`` with defaults;
    ``spends`` names the target kinds it takes as a budget (empty: it takes a ratio)."""

    kind: ClassVar[str] = "allocator"
    spends: ClassVar[frozenset[str]] = frozenset()

    def allocate(self, job: Allocation) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def aligned_removal(n: int, n_remove: int, round_to: int) -> int:
    """The largest count <= ``n_remove`` that leaves a slice of ``n`` units an aligned width (or 0)."""
    while n_remove > 0 and round_to > 1 and (n - n_remove) % round_to:
        n_remove -= 1
    return max(n_remove, 0)


def remove_lowest(removed: np.ndarray, candidates: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Mark the ``k`` lowest-scored of ``candidates`` removed (ties broken by position)."""
    if k > 0:
        removed[candidates[np.argsort(scores[candidates], kind="stable")[:k]]] = True


def remove_by_rate(job: Allocation, rate_of_group: np.ndarray) -> np.ndarray:
    """Every slice of group g loses the fraction ``rate_of_group[g]`` of its units (aligned, at least ``keep_min``
    kept, frozen units kept and counted in the width), lowest scores first."""
    removed = np.zeros(job.analysis.n_units, dtype=bool)
    for group in job.analysis.groups:
        for k, sl in enumerate(group.slices):
            n = len(sl)
            prunable = sl[~job.frozen[sl]]
            rate = float(rate_of_group[group.id])
            align = group.round_to(k, job.round_to)
            n_remove = min(n - kept_width(n, rate, align, job.keep_min), len(prunable))
            remove_lowest(removed, prunable, job.scores, aligned_removal(n, n_remove, align))
    return removed


def balance_lockstep(analysis: ChannelAnalysis, removed: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Give units back until every lockstep set loses as many units from each member (the heads of an attention keep
    equal widths: a Reshape to ``[heads, head_dim]`` needs it). Within a member, the highest-scored removed units
    come back first. Only ever adds units back, so every other constraint still holds."""
    sets = [m for g in analysis.groups for m in g.lockstep]
    if not sets:
        return removed
    removed = removed.copy()
    for _ in range(100):
        changed = False
        for members in sets:
            counts = [int(removed[m].sum()) for m in members]
            low = min(counts)
            for m, n in zip(members, counts):
                if n > low:
                    gone = m[removed[m]]
                    back = gone[np.argsort(-scores[gone], kind="stable")[: n - low]]
                    removed[back] = False
                    changed = True
        if not changed:
            return removed
    for members in sets:  # no fixed point (members sharing units unevenly): keep these heads whole
        for m in members:
            removed[m] = False
    return removed
