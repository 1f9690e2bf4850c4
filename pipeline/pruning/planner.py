"""From importance scores to a pruning plan: which channel units to remove.

:func:`plan` scores every unit with a criterion (:mod:`carve.pipeline.pruning.criterion`) and lets an allocator
(:mod:`carve.pipeline.pruning.allocator`) decide how many units each slice of each group loses. The built-in ``uniform``
allocator removes the same fraction of every slice (a slice is the set of units of a group that appear in exactly the
same tensors, so every tensor shrinks by the same ratio), rounds the kept width up to a multiple of ``round_to``
(channel alignment for the engine's kernels) and never keeps fewer than ``keep_min`` channels. Frozen units are never
removed. Criteria and allocators are reached through their registries only.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.plan import Plan
from carve.pipeline.progress import Progress
from carve.pipeline.pruning.allocator import LatencyModel, allocators, balance_lockstep
from carve.pipeline.pruning.cost_table import CostTable
from carve.pipeline.pruning.criterion import ScoreContext, criteria
from carve.pipeline.pruning.targets import bisect_ratio, check_countable


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
        raise CarveError(f"--exclude {' '.join(patterns)} matches no node", hint="`carve inspect` lists the node names")
    for rec in analysis.slice_records:
        if rec.node in matched:
            for u in np.unique(analysis.unit_of[rec.ids]):
                mask[u] = True
                reasons.setdefault(int(u), f"excluded by --exclude ({rec.node})")
    for s in analysis.sources:
        if s.name in matched:
            for u in np.unique(analysis.source_units(s)):
                mask[u] = True
                reasons.setdefault(int(u), f"excluded by --exclude ({s.name})")
    return mask, reasons


def plan(
    analysis: ChannelAnalysis,
    *,
    criterion: str = "l1",
    ratio: float = 0.5,
    round_to: int = 1,
    keep_min: int = 1,
    exclude: list[str] | tuple[str, ...] = (),
    allocator: str | None = None,
    seed: int = 0,
    calib: Any = None,
    criterion_options: dict[str, Any] | None = None,
    scores: np.ndarray | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    progress: Progress | None = None,
    target_latency: float | None = None,
    latency: LatencyModel | None = None,
    **allocator_options: Any,
) -> Plan:
    """Score the units with ``criterion`` and choose the ones to remove with ``allocator``.

    With ``target_macs`` (or ``target_params``), a fraction of the original model's MACs (params) to keep, the
    allocator's ``ratio`` is found by bisection: the smallest ratio whose predicted cost meets the target.
    With ``target_latency``, a fraction of the original's latency, and ``latency``, a latency table bound to this
    analysis (:meth:`carve.pipeline.measure.latency_table.LatencyTable.bind`): the ``latency`` allocator (the default
    then) solves a knapsack under that budget; any other allocator's ratio is bisected to the table's prediction.
    """
    if not 0 <= ratio < 1:
        raise CarveError(f"ratio must be in [0, 1), got {ratio}")
    targets = [t for t in (target_macs, target_params, target_latency) if t is not None]
    if len(targets) > 1:
        raise CarveError("give one of --target-macs, --target-params and --target-latency")
    target = targets[0] if targets else None
    if target is not None and not 0 < target <= 1:
        raise CarveError(f"a target is the fraction of the original to keep, in (0, 1]; got {target}")
    if target_latency is not None and latency is None:
        raise CarveError("a latency target needs a latency table", hint="give --lut FILE or let carve profile")
    if allocator is None:
        allocator = "latency" if target_latency is not None else "uniform"
    if round_to < 1 or keep_min < 1:
        raise CarveError("--round-to and --keep-min must be at least 1")
    if scores is None:
        scores = score_units(analysis, criterion, calib=calib, seed=seed, options=criterion_options, progress=progress)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (analysis.n_units,):
        raise AssertionError(f"criterion {criterion!r} returned {scores.shape} scores for {analysis.n_units} units")
    excl, _ = exclusion_mask(analysis, exclude)
    frozen = analysis.unit_frozen | excl
    alloc = allocators.get(allocator)(**allocator_options)

    job = {"criterion": criterion, "latency": latency, "latency_budget": target_latency}
    knapsack = allocator in ("latency", "knapsack") and target is not None
    if knapsack and target_latency is None:  # the knapsack under MACs or params: their exact cost table
        kind = "macs" if target_macs is not None else "params"
        if kind == "macs":
            check_countable(analysis)
        job.update(latency=CostTable(analysis, kind, round_to, keep_min), latency_budget=target)

    def allocate(r: float) -> np.ndarray:
        removed = alloc(analysis, scores, frozen, ratio=r, round_to=round_to, keep_min=keep_min, **job)
        return balance_lockstep(analysis, removed, scores)

    allocate.scores, allocate.round_to = scores, round_to  # type: ignore[attr-defined]  # for fill_to_target

    options: dict[str, Any] = {}
    if target is None or knapsack:
        removed = allocate(ratio if target is None else 0.0)
        if target_latency is not None:
            options["target_latency"] = target_latency
        elif target is not None:
            kind = "macs" if target_macs is not None else "params"
            achieved = float(job["latency"].predict(removed))
            options.update({f"target_{kind}": target, f"achieved_{kind}": round(achieved, 4)})
    else:
        kind = "macs" if target_macs is not None else "params" if target_params is not None else "latency"
        predict = latency.predict if kind == "latency" else None
        ratio, removed, achieved = bisect_ratio(analysis, allocate, target, kind, predict=predict)
        options.update({f"target_{kind}": target, f"achieved_{kind}": achieved})
    if latency is not None:
        options["predicted_latency"] = round(float(latency.predict(removed)), 4)
    options.update({"ratio": ratio, "round_to": round_to, "keep_min": keep_min, "exclude": list(exclude), "seed": seed})
    options.update({**allocator_options, **(criterion_options or {})})
    return Plan(analysis, removed, criterion, allocator, options, scores, frozen)


def score_units(
    analysis: ChannelAnalysis,
    criterion: str,
    *,
    calib: Any = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """One score per unit from a criterion (checking that it has the data it needs)."""
    crit = criteria.get(criterion)(**(options or {}))
    data_needs = crit.needs & {"activations", "labels", "gradients"}
    if data_needs and calib is None:
        raise CarveError(
            f"criterion {criterion!r} needs calibration data ({', '.join(sorted(data_needs))})",
            hint="give --calib FILE.npz | FOLDER | digits",
        )
    if "labels" in crit.needs and getattr(calib, "labels", None) is None:
        raise CarveError(f"criterion {criterion!r} needs labelled calibration data; {calib.name} has no labels")
    ctx = ScoreContext(analysis, seed=seed, calib=calib, progress=progress)
    return np.asarray(crit.unit_scores(ctx), dtype=np.float64)
