"""From importance scores to a pruning plan: which channel units to remove.

:func:`plan` scores every unit with a criterion (:mod:`pipeline.criteria`) and lets an allocator decide how many units
each slice of each group loses. The built-in ``uniform`` allocator removes the same fraction of every slice (a slice is
the set of units of a group that appear in exactly the same tensors, so every tensor shrinks by the same ratio), rounds
the kept width up to a multiple of ``round_to`` (channel alignment for the engine's kernels) and never keeps fewer than
``keep_min`` channels. Frozen units are never removed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .channels import ChannelAnalysis, Kind
from .criteria import ScoreContext, criteria
from .errors import CarveError
from .registry import Registry

allocators: Registry = Registry(
    "allocator", entry_point_group="carve.allocators", builtin_modules=["plugins.allocators"]
)


@dataclass
class Plan:
    analysis: ChannelAnalysis
    removed: np.ndarray  # bool per unit
    criterion: str = "manual"
    allocator: str = "manual"
    options: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None
    frozen: np.ndarray | None = None  # frozen mask used (analysis + --exclude)

    @property
    def n_removed(self) -> int:
        return int(self.removed.sum())

    def removed_channels(self) -> int:
        """Producer output channels removed (what a user calls 'channels')."""
        a = self.analysis
        return sum(int(self.removed[a.source_units(s)].sum()) for s in a.sources if s.kind == Kind.OUT)

    def summary(self, model_before=None, model_after=None, cost_before=None) -> dict:
        a = self.analysis
        total = sum(s.count for s in a.sources if s.kind == Kind.OUT)
        out: dict[str, Any] = {
            "criterion": self.criterion,
            "allocator": self.allocator,
            "options": self.options,
            "channels_before": total,
            "channels_removed": self.removed_channels(),
            "units_removed": self.n_removed,
            "groups_touched": int(len(np.unique(a.unit_group[self.removed]))) if self.n_removed else 0,
        }
        from .cost import model_cost

        c0 = cost_before or (model_cost(model_before) if model_before is not None else None)
        if c0 is not None:
            out.update(params_before=c0.params, macs_before=c0.macs)
            if model_after is not None:
                c1 = model_cost(model_after)
                out.update(params_after=c1.params, macs_after=c1.macs)
        return out


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


def kept_width(n: int, ratio: float, round_to: int = 1, keep_min: int = 1) -> int:
    """How many of ``n`` channels a slice keeps at ``ratio``: aligned up to ``round_to``, at least ``keep_min``."""
    keep = math.ceil(n * (1.0 - ratio) - 1e-9)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(n, max(keep, keep_min, 1))


def plan(
    analysis: ChannelAnalysis,
    *,
    criterion: str = "l1",
    ratio: float = 0.5,
    round_to: int = 1,
    keep_min: int = 1,
    exclude: list[str] | tuple[str, ...] = (),
    allocator: str = "uniform",
    seed: int = 0,
    calib: Any = None,
    criterion_options: dict[str, Any] | None = None,
    scores: np.ndarray | None = None,
    target_macs: float | None = None,
    target_params: float | None = None,
    **allocator_options: Any,
) -> Plan:
    """Score the units with ``criterion`` and choose the ones to remove with ``allocator``.

    With ``target_macs`` (or ``target_params``), a fraction of the original model's MACs (params) to keep, the
    allocator's ``ratio`` is found by bisection: the smallest ratio whose predicted cost meets the target.
    """
    if not 0 <= ratio < 1:
        raise CarveError(f"ratio must be in [0, 1), got {ratio}")
    if target_macs is not None and target_params is not None:
        raise CarveError("give --target-macs or --target-params, not both")
    target = target_macs if target_macs is not None else target_params
    if target is not None and not 0 < target <= 1:
        raise CarveError(f"a target is the fraction of the original to keep, in (0, 1]; got {target}")
    if round_to < 1 or keep_min < 1:
        raise CarveError("--round-to and --keep-min must be at least 1")
    if scores is None:
        scores = score_units(analysis, criterion, calib=calib, seed=seed, options=criterion_options)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (analysis.n_units,):
        raise AssertionError(f"criterion {criterion!r} returned {scores.shape} scores for {analysis.n_units} units")
    excl, _ = exclusion_mask(analysis, exclude)
    frozen = analysis.unit_frozen | excl
    alloc = allocators.get(allocator)

    def allocate(r: float) -> np.ndarray:
        return alloc(analysis, scores, frozen, ratio=r, round_to=round_to, keep_min=keep_min, **allocator_options)

    allocate.scores, allocate.round_to = scores, round_to  # type: ignore[attr-defined]  # for fill_to_target

    options: dict[str, Any] = {}
    if target is None:
        removed = allocate(ratio)
    else:
        kind = "macs" if target_macs is not None else "params"
        ratio, removed, achieved = bisect_ratio(analysis, allocate, target, kind)
        options.update({f"target_{kind}": target, f"achieved_{kind}": achieved})
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
    return np.asarray(crit.unit_scores(ScoreContext(analysis, seed=seed, calib=calib)), dtype=np.float64)


def bisect_ratio(analysis: ChannelAnalysis, allocate, target: float, kind: str = "macs", *, steps: int = 30):
    """The smallest allocator ratio whose predicted cost fraction is at most ``target``: (ratio, removed, achieved)."""
    from .cost import CostModel

    cost = CostModel(analysis)
    pick = 1 if kind == "macs" else 0

    def frac(removed: np.ndarray) -> float:
        return cost.ratios(removed)[pick]

    lo, hi = 0.0, 0.999
    removed_hi = allocate(hi)
    if frac(removed_hi) > target + 1e-9:
        raise CarveError(
            f"cannot reach {kind} {target:.3g} of the original: removing everything prunable leaves "
            f"{frac(removed_hi):.3g} (frozen channels, --keep-min and --round-to limit it)",
            hint="`carve inspect` shows what is frozen and why; lower --round-to / --keep-min or raise the target",
        )
    removed_lo = allocate(lo)
    if frac(removed_lo) <= target + 1e-9:
        return lo, removed_lo, frac(removed_lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        removed_mid = allocate(mid)
        if frac(removed_mid) <= target + 1e-9:
            hi, removed_hi = mid, removed_mid
        else:
            lo = mid
        if hi - lo < 1e-4:
            break
    removed = fill_to_target(analysis, removed_hi, scores_of(allocate), frac, target, round_to_of(allocate))
    return hi, removed, frac(removed)


def scores_of(allocate) -> np.ndarray | None:
    return getattr(allocate, "scores", None)


def round_to_of(allocate) -> int:
    return int(getattr(allocate, "round_to", 1))


def fill_to_target(
    analysis: ChannelAnalysis, removed: np.ndarray, scores: np.ndarray | None, frac, target: float, round_to: int = 1
) -> np.ndarray:
    """Give back aligned chunks of removed units while the cost stays within the target.

    Aligned widths move in coarse steps (16 channels rounded to 8 can only be 8 or 16), so the smallest ratio meeting
    a target can overshoot it by far. Chunks of ``round_to`` units (the highest-scored removed units of a slice) are
    restored, the least-kept slices first, as long as the predicted cost stays at most ``target``."""
    removed = removed.copy()
    s = scores if scores is not None else np.zeros(analysis.n_units)
    slices = [sl for g in analysis.groups for sl in g.slices]
    while True:
        candidates = []
        for sl in slices:
            gone = sl[removed[sl]]
            if not len(gone):
                continue
            kept = len(sl) - len(gone)
            size = min(len(gone), round_to)
            if (kept + size) % round_to and kept + size != len(sl):
                continue
            chunk = gone[np.argsort(-s[gone], kind="stable")[:size]]
            candidates.append((kept / len(sl), -float(s[chunk].mean()), chunk))
        candidates.sort(key=lambda c: (c[0], c[1]))
        for _, _, chunk in candidates:
            removed[chunk] = False
            if frac(removed) <= target + 1e-9:
                break
            removed[chunk] = True
        else:
            return removed
