"""Latency-constrained allocation: keep the most importance that fits a latency budget (HALP: Shen, Molchanov, Yin,
Alvarez, "Structural Pruning via Latency-Saliency Knapsack", NeurIPS 2022).

HALP measures a latency lookup table of every layer on the target engine and, at each pruning step, solves a knapsack:
maximise the summed importance of the kept channels subject to the latency budget, the latency of a layer read from
the table at its neighbours' current widths. Here the table is carve's per-group table
(:mod:`carve.pipeline.measure.latency_table`: each group's subgraph timed at candidate widths, bilinear where two groups
meet a conv), and the knapsack is a multiple-choice knapsack: every prunable group chooses one width.

* **Widths**: only the fast steps of each group's staircase (a width that costs what a wider one costs is never
  chosen), at least ``keep_min`` per slice and every frozen unit kept; this replaces ``--round-to``.
* **Value** of a width: the sum of the importance scores of the units it keeps (the highest-scored ones), on one
  scale across groups (``norm``: layers | mean | max | rank | none): by default each group's scores divided by
  their mean and multiplied by the number of layers the group's channels pass through. Mean alone makes a
  residual-stream channel, which every block of its stage reads and writes, worth a block's inner channel while it
  costs many times more, and the knapsack then thins the stream first; raw scores (``none``), even Taylor's
  loss estimates, swing from group to group with the 256 calibration images they come from. Measured on ResNet-56
  at equal MACs after the least-squares repair (benchmarks/allocation.json, docs/latency.md).
* **Cost**: the table's prediction, linearised per group around a point (HALP's "neighbours at their current
  widths"): starting from the uniform fraction that meets the budget, the knapsack is solved exactly by dynamic
  programming over the budget in ``bins`` steps (costs rounded up, so the linearised budget always holds), then
  re-linearised at its solution ``iterations`` times. The answer is always checked with the exact (bilinear)
  prediction: if that exceeds the budget the knapsack's budget is tightened by bisection; left-over budget is then
  spent greedily on the widenings with the best importance per latency. The result never exceeds the budget under
  the table, with one exception: a budget below what the narrowest widths are predicted to take, but within the
  table's stated error of it, gets the narrowest widths (the closed loop's measurement decides); a budget further
  out of reach is refused.

``knapsack`` is the same allocator under whichever target is given: a latency table's, or the exact MAC or parameter
cost of :mod:`carve.pipeline.pruning.cost_table` (widths aligned to ``--round-to``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carve.pipeline.errors import CarveError, UnreachableTarget
from carve.pipeline.pruning.allocator import Allocation, Allocator, allocators
from carve.pipeline.pruning.scoring import normalised


def solve_mckp(values: list[np.ndarray], costs: list[np.ndarray], budget: float, bins: int = 2000) -> list[int] | None:
    """Multiple-choice knapsack: one option per group, maximising the summed value with the summed cost <= budget.

    Exact dynamic programming over the budget discretised into ``bins`` steps, costs rounded up (so a returned
    choice always meets the budget; with integer costs and ``bins`` = the budget minus the cheapest choices it is
    the exact optimum). Returns the option index per group, or None when even the cheapest options exceed it."""
    floor = [float(np.min(c)) for c in costs]
    room = budget - sum(floor)
    if room < -1e-12:
        return None
    room = max(room, 0.0)
    step = room / bins if room > 0 else 1.0
    width = bins if room > 0 else 0
    q = [np.ceil((np.asarray(c, dtype=np.float64) - f) / step - 1e-9).astype(np.int64) for c, f in zip(costs, floor)]
    best = np.zeros(width + 1)
    choices = []
    for v, qc in zip(values, q):
        new = np.full(width + 1, -np.inf)
        pick = np.full(width + 1, -1, dtype=np.int64)
        for i, (val, need) in enumerate(zip(v, qc)):
            if need > width:
                continue
            cand = np.full(width + 1, -np.inf)
            cand[need:] = best[: width + 1 - need] + val
            better = cand > new
            new[better], pick[better] = cand[better], i
        best = new
        choices.append(pick)
    if not np.isfinite(best[width]):
        return None
    out, j = [], width
    for pick, qc in zip(reversed(choices), reversed(q)):
        i = int(pick[j])
        out.append(i)
        j -= int(qc[i])
    return out[::-1]


@dataclass
class _Group:
    gid: int
    options: list[list[int]]  # kept per slice, widest first
    factor: np.ndarray  # F_g per option
    value: np.ndarray  # kept importance per option
    share: float


@allocators.register("latency")
class LatencyKnapsack(Allocator):
    description = "the most importance that fits a latency target: knapsack over groups x measured widths (HALP)"
    options = {"norm": "layers", "bins": 2000, "iterations": 4}

    spends = frozenset({"latency"})

    def allocate(self, job: Allocation) -> np.ndarray:
        table, budget = job.cost, job.budget
        if table is None or budget is None:
            raise CarveError(f"allocator {self.name!r} spends a budget: it needs a cost table and a budget")
        an = job.analysis
        scores = self.importance(job)
        groups = self.groups(job, table, scores)
        pairs: dict[int, list[tuple[int, float]]] = {g.gid: [] for g in groups}
        for a, b, tau in table.pairs:
            if a in pairs and b in pairs:
                pairs[a].append((b, tau))
                pairs[b].append((a, tau))

        def predict(choice: list[int]) -> float:  # the table's own prediction of these widths
            return table.predict_kept({g.gid: g.options[c] for g, c in zip(groups, choice)})

        narrowest = [len(g.options) - 1 for g in groups]
        if predict(narrowest) > budget * (1 + table.error) + 1e-9:
            what = table.kind
            raise UnreachableTarget(
                f"cannot reach {what} {budget:.3g} of the original: the narrowest widths the "
                f"{'latency table' if what == 'latency' else 'alignment'} allows here predict {predict(narrowest):.3g}",
                hint="frozen channels, `exclude`, `keep_min` and `round_to` limit it; raise the target or look at "
                "`carve inspect`",
            )
        if predict(narrowest) > budget + 1e-9:  # out of the table's reach, but within its error: let measuring decide
            return self.removal(job, groups, narrowest, scores)
        if predict([0] * len(groups)) <= budget + 1e-9:
            return np.zeros(an.n_units, dtype=bool)

        def value(choice: list[int]) -> float:
            return float(sum(g.value[c] for g, c in zip(groups, choice)))

        def solve(point: list[int], target: float) -> list[int] | None:
            f_at = {g.gid: float(g.factor[c]) for g, c in zip(groups, point)}
            costs = []
            for g in groups:
                eff = g.share + sum(tau * (f_at[h] - 1.0) for h, tau in pairs[g.gid])
                costs.append((g.factor - 1.0) * max(eff, 0.0))
            room = target - predict(point) + sum(float(c[i]) for c, i in zip(costs, point))
            return solve_mckp([g.value for g in groups], costs, room, int(self.opts["bins"]))

        point = self.uniform_start(groups, predict, budget)
        best: list[int] | None = None
        for _ in range(int(self.opts["iterations"])):
            choice = solve(point, budget)
            if choice is None:
                break
            if predict(choice) <= budget + 1e-9 and (best is None or value(choice) > value(best)):
                best = choice
            if choice == point:
                break
            point = choice
        if best is None:  # the bilinear terms made every linearised answer too slow: tighten the knapsack's budget
            lo, hi = 0.0, budget
            for _ in range(30):
                mid = (lo + hi) / 2
                choice = solve(point, mid)
                if choice is not None and predict(choice) <= budget + 1e-9:
                    best, lo = choice, mid
                else:
                    hi = mid
            best = best if best is not None else narrowest
        best = self.fill(groups, best, predict, budget)
        return self.removal(job, groups, best, scores)

    # -- pieces -------------------------------------------------------------------------------------------------------
    def importance(self, job: Allocation) -> np.ndarray:
        norm = self.opts["norm"]
        if norm == "none":
            return np.asarray(job.scores, dtype=np.float64)
        return normalised(job.analysis, np.asarray(job.scores, dtype=np.float64), job.frozen, norm)

    def groups(self, job: Allocation, table, scores: np.ndarray) -> list[_Group]:
        out = []
        for gid, entry in sorted(table.entries.items()):
            slices = job.analysis.groups[gid].slices
            need = [max(int(job.frozen[sl].sum()), min(len(sl), job.keep_min)) for sl in slices]
            if all(n >= len(sl) for n, sl in zip(need, slices)):
                continue  # nothing of it may go
            idx = [i for i in entry.fast() if all(k >= n for k, n in zip(entry.candidates[i], need))]
            options = [entry.candidates[i] for i in idx]
            ranked = [self.ranked(sl, job.frozen, scores) for sl in slices]
            values = [sum(float(scores[r[:k]].sum()) for r, k in zip(ranked, kept)) for kept in options]
            factor = np.array([entry.ratio[i] for i in idx], dtype=np.float64)
            out.append(_Group(gid, options, factor, np.array(values), table.shares[gid]))
        return out

    @staticmethod
    def ranked(units: np.ndarray, frozen: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """A slice's units in the order they are kept: frozen ones first, then by descending score."""
        fz, free = units[frozen[units]], units[~frozen[units]]
        return np.concatenate([fz, free[np.argsort(-scores[free], kind="stable")]])

    @staticmethod
    def uniform_start(groups: list[_Group], predict, budget: float) -> list[int]:
        """Every group at the option nearest a common fraction of its width, the fraction bisected to the budget."""

        def at(frac: float) -> list[int]:
            out = []
            for g in groups:
                tot = np.array([sum(o) for o in g.options], dtype=np.float64)
                out.append(int(np.argmin(np.abs(tot - frac * tot[0]))))
            return out

        lo, hi = 0.0, 1.0
        for _ in range(25):
            mid = (lo + hi) / 2
            if predict(at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        return at(lo)

    @staticmethod
    def fill(groups: list[_Group], choice: list[int], predict, budget: float) -> list[int]:
        """Spend left-over budget: widen, one step at a time, the group with the most importance gained per latency."""
        choice = list(choice)
        while True:
            base = predict(choice)
            best, best_rate = None, -np.inf
            for k, g in enumerate(groups):
                if choice[k] == 0:
                    continue
                trial = choice[:k] + [choice[k] - 1] + choice[k + 1 :]
                p = predict(trial)
                if p > budget + 1e-9:
                    continue
                gain = float(g.value[choice[k] - 1] - g.value[choice[k]])
                if gain <= 0:
                    continue
                rate = gain / max(p - base, 1e-12)
                if rate > best_rate:
                    best, best_rate = trial, rate
            if best is None:
                return choice
            choice = best

    def removal(self, job: Allocation, groups: list[_Group], choice: list[int], scores: np.ndarray) -> np.ndarray:
        removed = np.zeros(job.analysis.n_units, dtype=bool)
        for g, c in zip(groups, choice):
            for sl, k in zip(job.analysis.groups[g.gid].slices, g.options[c]):
                removed[self.ranked(sl, job.frozen, scores)[k:]] = True
        return removed


@allocators.register("knapsack")
class Knapsack(LatencyKnapsack):
    """The same knapsack under whichever target is given: a latency target (a latency table), a MAC or parameter
    target (their exact cost, :mod:`carve.pipeline.pruning.cost_table`, widths aligned to ``round_to``)."""

    description = "the most importance that fits the target (latency, MACs or params): knapsack over groups x widths"
    spends = frozenset({"latency", "macs", "params"})
