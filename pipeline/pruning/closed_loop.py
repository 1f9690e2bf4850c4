"""Pruning for speed: what a latency target means, the channel multiple each backend's kernels want, what pruning
asks of measurement (:class:`LatencyOracle`, implemented by :class:`carve.pipeline.measure.oracle.MeasuredLatency`),
and the closed loop that checks a plan on the real engine and corrects it (NetAdapt, Yang et al., ECCV 2018: propose,
measure on the target, adjust).

A latency target (:class:`carve.pipeline.pruning.targets.Target` of kind ``latency``) of 0.5 is half the original's
latency on the chosen backend; ``4ms`` (``4000us``, ``0.004s``) an absolute budget. The plan is made against a latency
table's prediction; the pruned model (before repairs, which change weights, not shapes) is then measured against the
original in a quick interleaved A/B. When the measured latency misses the target by more than the table's stated error
(:func:`tolerance`: at most 5%, so that a table that is off by more than that is still corrected, and at least 3%, the
quick A/B's own spread), the table's budget is scaled by target / measured and the plan is made again, at most
``refine`` times; the step closest to the target (preferring one that meets it) is kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.surgery import prune
from carve.pipeline.pruning.targets import Target

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


@dataclass(frozen=True)
class Measured:
    """One interleaved A/B of a pruned model against its original: ``ratio`` (latency pruned / original, median of
    rounds), ``speedup`` with its confidence interval ``ci``, the medians ``a_ms`` (original) and ``b_ms``
    (pruned), and the ``clock`` that timed them."""

    ratio: float
    speedup: float
    ci: tuple[float, float]
    a_ms: float
    b_ms: float
    clock: str | None = None

    @classmethod
    def of(cls, m: dict) -> Measured:
        """From what :meth:`LatencyOracle.measure` returns."""
        return cls(m["ratio"], m["speedup"], tuple(m["ci"]), m["a_ms"], m["b_ms"], m.get("clock"))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ratio": self.ratio,
            "speedup": self.speedup,
            "ci": list(self.ci),
            "a_ms": self.a_ms,
            "b_ms": self.b_ms,
        }
        if self.clock is not None:
            out["clock"] = self.clock
        return out


@dataclass(frozen=True)
class LoopStep:
    """One measurement of the closed loop: the table budget planned for, the table's prediction, what was measured
    (a fraction of the original, or milliseconds for an absolute target) and its miss from the target."""

    budget: float
    predicted: float | None
    measured: float
    miss: float
    measurement: Measured
    stopped: str | None = None  # why no further step was made (a corrected budget out of the table's reach)

    def to_json(self) -> dict[str, Any]:
        out = {"budget": self.budget, "predicted": self.predicted, "measured": self.measured, "miss": self.miss}
        m = self.measurement.to_json()
        out.update({k: m[k] for k in ("speedup", "ci", "a_ms", "b_ms", "ratio", "clock") if k in m})
        if self.stopped is not None:
            out["stopped"] = self.stopped
        return out


@dataclass(frozen=True)
class Loop:
    """The closed loop's record: every step, which one was kept, and whether it met the target within ``error``."""

    target: Target
    error: float
    steps: list[LoopStep]
    chosen: int
    met: bool

    @property
    def kept(self) -> LoopStep:
        return self.steps[self.chosen]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.describe(),
            "error": self.error,
            "steps": [s.to_json() for s in self.steps],
            "chosen": self.chosen,
            "met": self.met,
        }


def closed_loop(
    model: Model,
    analysis: ChannelAnalysis,
    first: Plan,
    replan: Callable[[float], Plan],
    target: Target,
    oracle: LatencyOracle,
    *,
    error: float,
    refine: int = 2,
) -> tuple[Plan, Loop]:
    """Measure ``first`` (made for the target's budget), refine while it misses by more than ``error``; return the
    chosen plan and a record of every step (budget, predicted, measured)."""
    budget = float(first.options.get("target_latency", 1.0))
    steps: list[LoopStep] = []
    plans: list[Plan] = []
    p = first
    goal = target.value
    for k in range(refine + 1):
        m = Measured.of(oracle.measure(model, prune(model, p, verify=False)))
        measured = m.b_ms if target.absolute else m.ratio
        miss = round(measured / goal - 1.0, 4)
        step = LoopStep(round(budget, 4), p.options.get("predicted_latency"), round(measured, 4), miss, m)
        steps.append(step)
        plans.append(p)
        if abs(measured / goal - 1.0) <= error or k == refine:
            break
        if measured < goal and budget >= 1.0:  # faster than asked with nothing left to give back
            break
        budget = min(1.0, budget * goal / measured)
        try:
            p = replan(budget)
        except CarveError as exc:  # the corrected budget is out of the table's reach
            steps[-1] = replace(step, stopped=exc.message)
            break

    def rank(i: int) -> tuple[bool, float]:
        return (steps[i].miss > error, abs(steps[i].miss))

    best = min(range(len(steps)), key=rank)
    met = abs(steps[best].miss) <= error or steps[best].miss < 0
    return plans[best], Loop(target, round(error, 4), steps, best, met)
