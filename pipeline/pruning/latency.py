"""Pruning for speed: what a latency target means, the channel multiple each backend's kernels want, what pruning
asks of measurement (:class:`LatencyOracle`, implemented by :class:`carve.pipeline.measure.latency.MeasuredLatency`),
and the closed loop that checks a plan on the real engine and corrects it (NetAdapt, Yang et al., ECCV 2018: propose,
measure on the target, adjust).

``--target-latency 0.5`` is half the original's latency on the chosen backend; ``4ms`` (``4000us``, ``0.004s``) an
absolute budget. The plan is made against a latency table's prediction; the pruned model (before repairs, which change
weights, not shapes) is then measured against the original in a quick interleaved A/B. When the measured latency
misses the target by more than the table's stated error (:func:`tolerance`: at most 5%, so that a table that is off
by more than that is still corrected, and at least 3%, the quick A/B's own spread), the table's budget is scaled by
target / measured and the plan is made again, at most ``refine`` times; the step closest to the target (preferring
one that meets it) is kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.surgery import prune

# Channel multiple per backend (and device) when no table is given: what kernels run fastest on. ONNX Runtime's CPU
# convolutions use blocked NCHWc kernels whose block is the SIMD width: 16 floats with AVX-512, 8 with AVX2. Measured
# on this project's AVX-512 machine (docs/latency.md): multiples of 16 were the fast steps of every staircase, the
# multiples of 8 between them were not. GPUs: tensor cores want multiples of 8 (FP16).
GPU_ALIGNMENT = 8


def default_alignment(backend: str, device: str = "cpu") -> int:
    """The channel multiple ``--round-to`` defaults to for ``backend`` on ``device`` (8 where carve knows no better)."""
    if backend in ("ort", "torch-cpu") and device == "cpu":
        return 16 if cpu_has("avx512f") else 8
    return GPU_ALIGNMENT


CPU_FLAGS_ENV = "CARVE_CPU_FLAGS"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags carve plans for: ``$CARVE_CPU_FLAGS`` (space- or comma-separated, e.g. ``avx2 fma``) when
    set, so that a model can be prepared for a deployment CPU other than this one (and tests pin the capability they
    test), else the host's, from /proc/cpuinfo (none where that cannot be read)."""
    forced = os.environ.get(CPU_FLAGS_ENV)
    if forced is not None:
        return frozenset(forced.replace(",", " ").split())
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has(flag: str) -> bool:
    return flag in cpu_flags()


_UNITS = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3}


@dataclass(frozen=True)
class LatencyTarget:
    """A fraction of the original's latency, or an absolute latency in milliseconds."""

    fraction: float | None = None
    ms: float | None = None

    def budget(self, reference_ms: float) -> float:
        """The target as a fraction of a latency of ``reference_ms`` (the table's or the measured original's)."""
        return self.fraction if self.fraction is not None else self.ms / reference_ms

    def describe(self) -> str:
        return f"{self.fraction:g} of the original" if self.fraction is not None else f"{self.ms:g} ms"


def parse_target(value: float | str) -> LatencyTarget:
    """``0.5`` / ``50%`` (a fraction of the original's latency) or ``4ms`` / ``4000us`` / ``0.004s`` (absolute)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = repr(float(value))
    else:
        text = str(value).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)(%|s|ms|us|µs)?", text)
    if not m:
        raise CarveError(
            f"--target-latency {value!r}: give a fraction of the original's latency (0.5, 50%) or a time (4ms, 800us)"
        )
    number, unit = float(m.group(1)), m.group(2)
    if unit in _UNITS:
        if number <= 0:
            raise CarveError(f"--target-latency {value!r}: a latency budget must be positive")
        return LatencyTarget(ms=number * _UNITS[unit])
    fraction = number / 100 if unit == "%" else number
    if not 0 < fraction <= 1:
        raise CarveError(
            f"--target-latency {value!r}: a fraction of the original's latency is in (0, 1]",
            hint="for an absolute budget give a unit, e.g. 4ms",
        )
    return LatencyTarget(fraction=fraction)


def tolerance(stated_error: float) -> float:
    """How far a measured latency may miss its target before the closed loop refines: the table's stated error,
    within [3%, 5%]."""
    return min(max(float(stated_error), 0.03), 0.05)


class LatencyOracle(Protocol):
    """What pruning needs from measurement: a latency table for a model and a quick A/B of two models."""

    def describe(self) -> str:
        """The backend and settings, for messages (e.g. ``ort cpu, 1 thread, batch 1``)."""

    def table(self, model: Model) -> Any:
        """The latency table of ``model`` (loaded, cached or profiled): ``bind(analysis)``, ``model_ms``,
        ``stated_error``."""

    def measure(self, original: Model, pruned: Model) -> dict:
        """Interleaved A/B of ``pruned`` against ``original``: ``ratio`` (latency of pruned / original, median of
        rounds), ``speedup`` with ``ci``, ``a_ms``, ``b_ms`` (medians), ``clock``."""


def closed_loop(
    model: Model,
    analysis: ChannelAnalysis,
    first: Plan,
    replan: Callable[[float], Plan],
    target: LatencyTarget,
    oracle: LatencyOracle,
    *,
    error: float,
    refine: int = 2,
) -> tuple[Plan, dict]:
    """Measure ``first`` (made for the target's budget), refine while it misses by more than ``error``; return the
    chosen plan and a record of every step (budget, predicted, measured)."""
    budget = float(first.options.get("target_latency", 1.0))
    steps: list[dict] = []
    plans: list[Plan] = []
    p = first
    for k in range(refine + 1):
        m = oracle.measure(model, prune(model, p, verify=False))
        measured = m["ratio"] if target.fraction is not None else m["b_ms"]
        goal = target.fraction if target.fraction is not None else target.ms
        steps.append(
            {
                "budget": round(budget, 4),
                "predicted": p.options.get("predicted_latency"),
                "measured": round(measured, 4),
                "miss": round(measured / goal - 1.0, 4),
                **{key: m[key] for key in ("speedup", "ci", "a_ms", "b_ms", "ratio", "clock") if key in m},
            }
        )
        plans.append(p)
        if abs(measured / goal - 1.0) <= error or k == refine:
            break
        if measured < goal and budget >= 1.0:  # faster than asked with nothing left to give back
            break
        budget = min(1.0, budget * goal / measured)
        try:
            p = replan(budget)
        except CarveError as exc:  # the corrected budget is out of the table's reach
            steps[-1]["stopped"] = exc.message
            break

    def rank(i: int) -> tuple[bool, float]:
        return (steps[i]["miss"] > error, abs(steps[i]["miss"]))

    best = min(range(len(steps)), key=rank)
    record = {
        "target": target.describe(),
        "error": round(error, 4),
        "steps": steps,
        "chosen": best,
        "met": abs(steps[best]["miss"]) <= error or steps[best]["miss"] < 0,
    }
    return plans[best], record
