"""Reaching a MAC, parameter or latency target: the smallest allocator ratio whose predicted cost meets it (bisection
on the :class:`~carve.pipeline.graph.cost.CostModel`, or on a latency table's prediction; no surgery), then aligned
chunks given back while the target still holds."""

from __future__ import annotations

import numpy as np

from carve.pipeline.errors import CarveError, UnreachableTarget
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.cost import CostModel
from carve.pipeline.graph.shapes import unknown_conv_outputs
from carve.pipeline.pruning.allocator import balance_lockstep


def check_countable(analysis: ChannelAnalysis) -> None:
    """Refuse a MAC target on a model whose conv output sizes are unknown (their MACs would count as 0)."""
    unknown = unknown_conv_outputs(analysis.model)
    if unknown:
        raise CarveError(
            f"--target-macs: the output size of {len(unknown)} layer(s) is unknown (first: {unknown[0]!r}), so "
            "their MACs cannot be counted and a MAC target would be met on wrong numbers",
            hint="give the input size with --input-shape CxHxW (the model's input dimensions are dynamic)",
        )


def bisect_ratio(
    analysis: ChannelAnalysis, allocate, target: float, kind: str = "macs", *, steps: int = 30, predict=None
):
    """The smallest allocator ratio whose predicted cost fraction is at most ``target``: (ratio, removed, achieved).
    ``kind`` is macs or params (the cost model), or latency with ``predict`` (removal mask -> fraction)."""
    if kind == "macs":
        check_countable(analysis)
    if predict is not None:
        frac = predict
    else:
        cost = CostModel(analysis)
        pick = 1 if kind == "macs" else 0

        def frac(removed: np.ndarray) -> float:
            return cost.ratios(removed)[pick]

    lo, hi = 0.0, 0.999
    removed_hi = allocate(hi)
    if frac(removed_hi) > target + 1e-9:
        raise UnreachableTarget(
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
    slices = [(sl, g.round_to(j, round_to)) for g in analysis.groups for j, sl in enumerate(g.slices)]
    while True:
        candidates = []
        for sl, align in slices:
            gone = sl[removed[sl]]
            if not len(gone):
                continue
            kept = len(sl) - len(gone)
            size = min(len(gone), align)
            if (kept + size) % align and kept + size != len(sl):
                continue
            chunk = gone[np.argsort(-s[gone], kind="stable")[:size]]
            candidates.append((kept / len(sl), -float(s[chunk].mean()), chunk))
        candidates.sort(key=lambda c: (c[0], c[1]))
        for _, _, chunk in candidates:
            trial = removed.copy()
            trial[chunk] = False
            trial = balance_lockstep(analysis, trial, s)  # the other heads of an attention give back as much
            if frac(trial) <= target + 1e-9:
                removed = trial
                break
        else:
            return removed
