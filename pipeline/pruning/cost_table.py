"""MACs or parameters as a knapsack cost: the exact analytic counterpart of a measured latency table.

The ``knapsack`` allocator (``plugins/allocators/knapsack.py``) maximises kept importance under a budget whose cost is
predicted from per-group factors, ``P = 1 + sum_g t_g (F_g - 1) + sum_(g,h) tau_gh (F_g - 1) (F_h - 1)``. For a
latency table t and tau are measured; for MACs (or parameters) they are exact: a weight of M MACs whose output
channels belong to group a and input channels to group b costs ``M F_a F_b`` after pruning, which expands into a
share for a, a share for b and one bilinear term. An axis that several groups feed (a Concat's consumer) splits its
share by their unit counts. ``F_g`` is the kept fraction of g's units; candidates are the widths aligned to
``round_to`` (every one of them is a "fast step": a MAC count has no staircase), so this is HALP's knapsack with the
cost a user asked for, and the allocator compares groups on one importance scale under it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.cost import CostModel, bilinear_ratio
from carve.pipeline.pruning.allocator import kept_width


@dataclass
class CostEntry:
    """One group's candidate widths (kept units per slice, widest first) and their cost factors F_g."""

    group: int
    slices: list[int]
    candidates: list[list[int]]
    ratio: list[float]

    def fast(self) -> list[int]:
        return list(range(len(self.candidates)))


class CostTable:
    """MACs (``kind="macs"``) or parameters (``"params"``) of a pruned model as a fraction of the original's, in the
    form the knapsack reads (:class:`carve.pipeline.pruning.allocator.Costs`): exact, so ``error`` is 0.

    Each cut weight tensor's cost scales with the product, over its cut axes, of the kept fraction of that axis; an
    axis's kept fraction is linear in the kept fractions of the group slices whose units it holds (matrix ``A``).
    ``predict_kept`` evaluates that exactly; ``shares``/``pairs`` are its first and second order terms in the group
    factors (exact when every slice of a group keeps the same fraction), for the knapsack's linearisation."""

    error = 0.0
    reference_ms = float("nan")

    def __init__(self, analysis: ChannelAnalysis, kind: str = "macs", round_to: int = 1, keep_min: int = 1) -> None:
        if kind not in ("macs", "params"):
            raise ValueError(f"cost kind {kind!r}: macs or params")
        self.analysis, self.kind = analysis, kind
        self.cost = CostModel(analysis)
        # every slice of every group is one column: its units, its group
        self.column: dict[tuple[int, int], int] = {}
        col_of_unit = np.full(analysis.n_units, -1, dtype=np.int64)
        self.slice_size: list[int] = []
        for g in analysis.groups:
            for k, sl in enumerate(g.slices):
                self.column[(g.id, k)] = len(self.slice_size)
                col_of_unit[sl] = len(self.slice_size)
                self.slice_size.append(len(sl))
        group_of_col = np.array([g for g, _ in self.column], dtype=np.int64)
        total = float(self.cost.base.macs if kind == "macs" else self.cost.base.params) or 1.0
        rows, weights, tensor_axes = [], [], []
        for dims, axes, is_param, wmacs in self.cost.tensors:
            weight = (wmacs if kind == "macs" else (int(np.prod(dims)) if is_param else 0)) / total
            if not weight:
                continue
            here = []
            for units in axes.values():
                row = np.bincount(col_of_unit[units], minlength=len(self.slice_size)) / len(units)
                here.append(len(rows))
                rows.append(row)
            weights.append(weight)
            tensor_axes.append(here)
        self.A = np.array(rows, dtype=np.float64).reshape(len(rows), len(self.slice_size))
        width = max((len(a) for a in tensor_axes), default=1)
        one = len(rows)  # an extra axis that is always whole, padding tensors with fewer cut axes
        self.axes = np.array([a + [one] * (width - len(a)) for a in tensor_axes], dtype=np.int64).reshape(-1, width)
        self.weights = np.array(weights, dtype=np.float64)
        self.constant = 1.0 - float(self.weights.sum())
        # the group-factor expansion: P = 1 + sum_g t_g (F_g - 1) + sum tau_gh (F_g - 1)(F_h - 1) (+ higher orders)
        onehot = np.zeros((len(self.slice_size), len(analysis.groups)))
        onehot[np.arange(len(self.slice_size)), group_of_col] = 1.0
        by_group = np.vstack([self.A @ onehot, np.zeros(len(analysis.groups))])  # [axis, group]: its share of units
        shares: dict[int, float] = {}
        pairs: dict[tuple[int, int], float] = {}
        for w, ax in zip(self.weights, self.axes):
            mix = [by_group[a] for a in ax if a != one]
            for m in mix:
                for g in np.flatnonzero(m):
                    shares[int(g)] = shares.get(int(g), 0.0) + w * m[g]
            for i in range(len(mix)):
                for j in range(i + 1, len(mix)):
                    for g in np.flatnonzero(mix[i]):
                        for h in np.flatnonzero(mix[j]):
                            key = (int(min(g, h)), int(max(g, h)))
                            pairs[key] = pairs.get(key, 0.0) + w * mix[i][g] * mix[j][h]
        self.shares = shares
        self.pairs = [(a, b, t) for (a, b), t in sorted(pairs.items())]
        self.entries = {gid: self._entry(gid, round_to, keep_min) for gid in sorted(shares)}

    def _entry(self, gid: int, round_to: int, keep_min: int) -> CostEntry:
        group = self.analysis.groups[gid]
        slices = [len(sl) for sl in group.slices]
        aligns = [group.round_to(k, round_to) for k in range(len(slices))]
        top = max(slices)
        seen, cands = set(), []
        for kept_top in range(top, 0, -1):
            kept = [kept_width(n, 1.0 - kept_top / top, a, keep_min) for n, a in zip(slices, aligns)]
            if tuple(kept) not in seen:
                seen.add(tuple(kept))
                cands.append(kept)
        n = float(sum(slices))
        return CostEntry(gid, slices, cands, [sum(c) / n for c in cands])

    def predict_factors(self, f: dict[int, float]) -> float:
        """From one factor per group (every slice at that fraction): the expansion's terms."""
        return bilinear_ratio(self.shares, self.pairs, f)

    def predict_kept(self, kept: dict[int, list[int]]) -> float:
        """Exact, from kept units per slice of the groups given (the others whole)."""
        x = np.ones(len(self.slice_size))
        for gid, per_slice in kept.items():
            for k, n in enumerate(per_slice):
                x[self.column[(gid, k)]] = n / self.slice_size[self.column[(gid, k)]]
        frac = np.append(self.A @ x, 1.0)
        return float(self.constant + self.weights @ np.prod(frac[self.axes], axis=1))

    def predict(self, removed: np.ndarray) -> float:
        removed = np.asarray(removed, dtype=bool)
        kept = {g.id: [len(sl) - int(removed[sl].sum()) for sl in g.slices] for g in self.analysis.groups}
        return self.predict_kept(kept)
