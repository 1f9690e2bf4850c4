"""How much to prune, said once: a :class:`Target` (a ratio, or a fraction of the original's MACs, parameters or
latency to keep), parsed and validated where it enters (options, a recipe, a sweep axis) and handed on typed.

Reaching a MAC, parameter or latency target with a ratio allocator: the smallest allocator ratio whose predicted cost
meets it (bisection on the :class:`~carve.pipeline.graph.cost.CostModel`, or on a latency table's prediction; no
surgery), then aligned chunks given back while the target still holds."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError, UnreachableTarget
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.cost import CostModel
from carve.pipeline.graph.shapes import unknown_conv_outputs
from carve.pipeline.pruning.allocator import balance_lockstep

KINDS = ("ratio", "macs", "params", "latency")
# the option (command line and recipe key) each kind is given as
OPTION = {"ratio": "ratio", "macs": "target_macs", "params": "target_params", "latency": "target_latency"}
_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


@dataclass(frozen=True)
class Target:
    """How much to prune.

    * ``ratio``: ``value`` is the fraction of every group's channels the allocator removes, in [0, 1);
    * ``macs`` / ``params``: ``value`` is the fraction of the original's MACs / parameters to keep, in (0, 1];
    * ``latency``: ``value`` is the fraction of the original's latency on the chosen engine, in (0, 1], or with
      ``absolute`` a latency in milliseconds (> 0).

    Constructing one validates it; :meth:`parse` also reads ``50%`` and ``4ms``; :meth:`from_options` picks the one
    target of a set of options."""

    kind: str
    value: float
    absolute: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CarveError(f"unknown target kind {self.kind!r}; valid: {', '.join(KINDS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
            raise CarveError(f"`{self.option}` must be a number, got {v!r}")
        object.__setattr__(self, "value", float(v))
        if self.absolute:
            if self.kind != "latency":
                raise CarveError(f"`{self.option}` is a fraction; only a latency target may be a time")
            if not v > 0:
                raise CarveError(f"`{self.option}` {v!r} ms: a latency budget must be positive")
        elif self.kind == "ratio" and not 0 <= v < 1:
            raise CarveError(f"`ratio` must be in [0, 1) (the fraction of each group removed); got {v!r}")
        elif self.kind != "ratio" and not 0 < v <= 1:
            hint = "for an absolute budget give a unit, e.g. 4ms" if self.kind == "latency" else None
            raise CarveError(
                f"`{self.option}` is the fraction of the original's {self.kind} to keep, in (0, 1]; got {v!r}",
                hint=hint,
            )

    @classmethod
    def ratio(cls, value: float) -> Target:
        return cls("ratio", value)

    @classmethod
    def parse(cls, kind: str, value: Any) -> Target:
        """A target from what a user wrote: a number, ``50%``, or for latency also a time (``4ms``, ``800us``,
        ``0.004s``)."""
        if isinstance(value, Target):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return cls(kind, float(value))
        text = str(value).strip().lower().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(%|s|ms|us|µs)?", text)
        if not m or (m.group(2) in _UNITS and kind != "latency"):
            option = OPTION.get(kind, kind)
            what = "a fraction (0.5, 50%)" + (" or a time (4ms, 800us)" if kind == "latency" else "")
            raise CarveError(f"`{option}` {value!r}: give {what}")
        number, unit = float(m.group(1)), m.group(2)
        if unit in _UNITS:
            return cls(kind, number * _UNITS[unit], absolute=True)
        return cls(kind, number / 100 if unit == "%" else number)

    @classmethod
    def from_options(
        cls,
        *,
        ratio: float | None = None,
        target_macs: float | None = None,
        target_params: float | None = None,
        target_latency: float | str | None = None,
    ) -> Target:
        """The one target a set of options gives: ``target_macs``, ``target_params`` or ``target_latency`` (at most
        one of them), else ``ratio``."""
        given = {k: v for k, v in (("macs", target_macs), ("params", target_params), ("latency", target_latency))}
        given = {k: v for k, v in given.items() if v is not None}
        if len(given) > 1:
            raise CarveError("give one of `target_macs`, `target_params` and `target_latency`")
        if given:
            ((kind, value),) = given.items()
            return cls.parse(kind, value)
        return cls("ratio", 0.5 if ratio is None else ratio)

    @property
    def option(self) -> str:
        """The option this target is given as (``target_macs``)."""
        return OPTION[self.kind]

    @property
    def fraction(self) -> float | None:
        """The fraction of the original kept (None for a ratio or an absolute latency)."""
        return None if self.kind == "ratio" or self.absolute else self.value

    @property
    def ms(self) -> float | None:
        """An absolute latency budget in milliseconds (else None)."""
        return self.value if self.absolute else None

    def budget(self, reference_ms: float | None = None) -> float:
        """The target as a fraction of the original; an absolute latency as a fraction of ``reference_ms`` (the
        table's or the measured original's latency)."""
        if self.absolute:
            if not reference_ms:
                raise CarveError("an absolute latency target needs the original's latency to compare with")
            return self.value / reference_ms
        return self.value

    def describe(self) -> str:
        """``0.5 of the original`` / ``4 ms`` (latency), ``MACs 0.5``, ``ratio 0.5``."""
        if self.kind == "latency":
            return f"{self.value:g} ms" if self.absolute else f"{self.value:g} of the original"
        return f"{'MACs' if self.kind == 'macs' else self.kind} {self.value:g}"


def check_countable(analysis: ChannelAnalysis) -> None:
    """Refuse a MAC target on a model whose conv output sizes are unknown (their MACs would count as 0)."""
    unknown = unknown_conv_outputs(analysis.model)
    if unknown:
        raise CarveError(
            f"`target_macs`: the output size of {len(unknown)} layer(s) is unknown (first: {unknown[0]!r}), so "
            "their MACs cannot be counted and a MAC target would be met on wrong numbers",
            hint="give the input size with `input_shape` CxHxW (the model's input dimensions are dynamic)",
        )


def bisect_ratio(
    analysis: ChannelAnalysis,
    allocate: Callable[[float], np.ndarray],
    target: float,
    kind: str = "macs",
    *,
    scores: np.ndarray | None = None,
    round_to: int = 1,
    steps: int = 30,
    predict: Callable[[np.ndarray], float] | None = None,
):
    """The smallest allocator ratio whose predicted cost fraction is at most ``target``: (ratio, removed, achieved).
    ``kind`` is macs or params (the cost model), or latency with ``predict`` (removal mask -> fraction). ``scores``
    and ``round_to`` decide which aligned chunks are given back afterwards (:func:`fill_to_target`)."""
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
            f"{frac(removed_hi):.3g} (frozen channels, `keep_min` and `round_to` limit it)",
            hint="`carve inspect` shows what is frozen and why; lower `round_to` / `keep_min` or raise the target",
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
    removed = fill_to_target(analysis, removed_hi, scores, frac, target, round_to)
    return hi, removed, frac(removed)


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
