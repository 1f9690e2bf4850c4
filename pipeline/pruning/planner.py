"""From importance scores to a pruning plan: which channel units to remove.

    scores = score(analysis, "taylor", calib=data)                   # one score per unit (a Scores)
    p = plan(analysis, Target("macs", 0.5), scores=scores, allocator="knapsack", widths=Widths(round_to=8))
    p = plan(analysis, 0.5)                                          # a ratio, L1 scores, uniform, no alignment

:func:`score` runs a criterion (:mod:`carve.pipeline.pruning.criterion`); :func:`plan` lets an allocator
(:mod:`carve.pipeline.pruning.allocator`) decide how many units each slice of each group loses to meet the
:class:`~carve.pipeline.pruning.targets.Target`. The built-in ``uniform`` allocator removes the same fraction of every
slice (a slice is the set of units of a group that appear in exactly the same tensors, so every tensor shrinks by the
same ratio), rounds the kept width to the nearest multiple of ``round_to`` (channel alignment for the engine's
kernels) and never keeps fewer than ``keep_min`` channels. Frozen units are never removed. Criteria and allocators are
reached through their registries (by name) or given configured.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.plan import Plan
from carve.pipeline.progress import Progress
from carve.pipeline.pruning.allocator import Allocation, Allocator, Costs, allocators, balance_lockstep
from carve.pipeline.pruning.cost_table import CostTable
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria
from carve.pipeline.pruning.targets import Target, bisect_ratio, check_countable


@dataclass(frozen=True)
class Widths:
    """Constraints on the widths a plan keeps: multiples of ``round_to`` (or whole), at least ``keep_min`` channels
    per slice, and nothing removed from channels touching a node whose name matches an ``exclude`` glob."""

    round_to: int = 1
    keep_min: int = 1
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.round_to < 1 or self.keep_min < 1:
            raise CarveError("`round_to` and `keep_min` must be at least 1")
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass(frozen=True)
class Scores:
    """One importance score per channel unit, and what produced them (recorded with the plan)."""

    values: np.ndarray
    criterion: str = "manual"
    options: dict[str, Any] = field(default_factory=dict)  # the criterion's options as given
    seed: int = 0


def exclusion_mask(
    analysis: ChannelAnalysis, patterns: list[str] | tuple[str, ...]
) -> tuple[np.ndarray, dict[int, str]]:
    """Units touching a node whose name matches a glob pattern: produced, consumed or carried by it."""
    mask = np.zeros(analysis.n_units, dtype=bool)
    reasons: dict[int, str] = {}
    if not patterns:
        return mask, reasons
    nodes = set(analysis.model.nodes)
    matched = {n for n in nodes if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not matched:
        raise CarveError(f"`exclude` {' '.join(patterns)} matches no node", hint="`carve inspect` lists the node names")
    for rec in analysis.slice_records:
        if rec.node in matched:
            for u in np.unique(analysis.unit_of[rec.ids]):
                mask[u] = True
                reasons.setdefault(int(u), f"excluded by `exclude` ({rec.node})")
    for s in analysis.sources:
        if s.name in matched:
            for u in np.unique(analysis.source_units(s)):
                mask[u] = True
                reasons.setdefault(int(u), f"excluded by `exclude` ({s.name})")
    return mask, reasons


def plan(
    analysis: ChannelAnalysis,
    target: Target | float = 0.5,
    *,
    scores: Scores | str = "l1",
    allocator: str | Allocator | None = None,
    widths: Widths | None = None,
    latency: Costs | None = None,
) -> Plan:
    """Choose the units to remove to meet ``target`` (a :class:`Target`, or a ratio).

    ``scores``: a :class:`Scores` (from :func:`score`), or a criterion name scored with its defaults and no data.
    ``allocator``: a name (its default options) or a configured :class:`Allocator`; by default ``latency`` for a
    latency target, else ``uniform``. A ratio allocator meets a MAC, parameter or latency target by bisecting its
    ratio; a budget allocator (``knapsack``) spends the target under its cost table. ``latency``: a latency table
    bound to this analysis (:meth:`carve.pipeline.measure.latency_table.LatencyTable.bind`), needed by a latency
    target and giving every plan its predicted latency.
    """
    target = target if isinstance(target, Target) else Target.ratio(target)
    widths = widths or Widths()
    if isinstance(scores, str):
        scores = score(analysis, scores)
    values = np.asarray(scores.values, dtype=np.float64)
    if values.shape != (analysis.n_units,):
        raise AssertionError(f"criterion {scores.criterion!r} gave {values.shape} scores for {analysis.n_units} units")
    if target.kind == "latency" and latency is None:
        raise CarveError("a latency target needs a latency table", hint="give `lut` FILE or let carve profile")
    if target.absolute:
        raise CarveError("plan() takes a latency target as a fraction of the original's latency", hint="Target.budget")
    alloc = allocator_for(allocator, target)
    excl, _ = exclusion_mask(analysis, widths.exclude)
    frozen = analysis.unit_frozen | excl
    job = Allocation(analysis, values, frozen, 0.0, widths.round_to, widths.keep_min, scores.criterion)

    options: dict[str, Any] = {}
    ratio = target.value if target.kind == "ratio" else 0.0
    if alloc.spends:
        job.cost, job.budget = _costs(analysis, target, widths, latency), target.value
        removed = balance_lockstep(analysis, alloc.allocate(job), values)
        if target.kind == "latency":
            options["target_latency"] = target.value
        else:
            achieved = float(job.cost.predict(removed))
            options.update({target.option: target.value, f"achieved_{target.kind}": round(achieved, 4)})
    elif target.kind == "ratio":
        job.ratio = ratio
        removed = balance_lockstep(analysis, alloc.allocate(job), values)
    else:

        def allocate(r: float) -> np.ndarray:
            job.ratio = r
            return balance_lockstep(analysis, alloc.allocate(job), values)  # heads of an attention: equal widths

        predict = latency.predict if target.kind == "latency" else None
        ratio, removed, achieved = bisect_ratio(
            analysis, allocate, target.value, target.kind, scores=values, round_to=widths.round_to, predict=predict
        )
        options.update({target.option: target.value, f"achieved_{target.kind}": achieved})
    if latency is not None:
        options["predicted_latency"] = round(float(latency.predict(removed)), 4)
    options.update({"ratio": ratio, "round_to": widths.round_to, "keep_min": widths.keep_min})
    options.update({"exclude": list(widths.exclude), "seed": scores.seed, **alloc.given, **scores.options})
    return Plan(analysis, removed, scores.criterion, alloc.name, options, values, frozen)


def allocator_for(
    allocator: str | Allocator | None, target: Target, options: dict[str, Any] | None = None
) -> Allocator:
    """The allocator to use (a name with its ``options``, a configured one, or None: ``latency`` for a latency
    target, else ``uniform``), checked against the target: a budget allocator needs a target of a kind it spends."""
    if allocator is None:
        allocator = "latency" if target.kind == "latency" else "uniform"
    alloc = allocators.get(allocator)(**(options or {})) if isinstance(allocator, str) else allocator
    if alloc.spends and target.kind not in alloc.spends:
        options = ", ".join(f"`target_{k}`" for k in sorted(alloc.spends))
        raise CarveError(
            f"allocator {alloc.name!r} needs a target: {options} (it spends a budget)",
            hint="a `ratio` is for the uniform, global and dispersion allocators",
        )
    return alloc


def _costs(analysis: ChannelAnalysis, target: Target, widths: Widths, latency: Costs | None) -> Costs:
    """The cost table a budget allocator spends the target under: the latency table, or the exact MAC/param table."""
    if target.kind == "latency":
        return latency
    if target.kind == "macs":
        check_countable(analysis)
    return CostTable(analysis, target.kind, widths.round_to, widths.keep_min)


def score(
    analysis: ChannelAnalysis,
    criterion: str | Criterion = "l1",
    *,
    options: dict[str, Any] | None = None,
    calib: Any = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> Scores:
    """One score per unit from a criterion (a name with its ``options``, or a configured :class:`Criterion`),
    checking that it has the data it needs."""
    crit = criteria.get(criterion)(**(options or {})) if isinstance(criterion, str) else criterion
    name = crit.name or type(crit).__name__
    data_needs = crit.needs & {"activations", "labels", "gradients"}
    if data_needs and calib is None:
        raise CarveError(
            f"criterion {name!r} needs calibration data ({', '.join(sorted(data_needs))})",
            hint="give `calib` FILE.npz | FOLDER | digits",
        )
    if "labels" in crit.needs and getattr(calib, "labels", None) is None:
        raise CarveError(f"criterion {name!r} needs labelled calibration data; {calib.name} has no labels")
    ctx = ScoreContext(analysis, seed=seed, calib=calib, progress=progress)
    return Scores(np.asarray(crit.unit_scores(ctx), dtype=np.float64), name, dict(crit.given), seed)
