"""What a prune did, typed: :class:`PruneReport`, returned by :func:`carve.pipeline.pruning.prune.prune_model` and read
by attribute (the CLI, the ``prune`` and ``gradual`` passes, the Python API). :meth:`PruneReport.to_json` is the
summary ``carve prune --json`` prints and the model's ``carve.prune`` history entry holds (written once, by the prune
operation, from this report)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.surgery import Cut
from carve.pipeline.pruning.closed_loop import Loop, Measured
from carve.pipeline.pruning.targets import Target


@dataclass(frozen=True)
class Verified:
    """The pruned model equals its reference in ONNX Runtime: the largest absolute difference, and the output scale
    it is relative to."""

    max_abs_diff: float
    scale: float
    # "zeroed": the original with the removed channels' consumer columns zeroed; "masked statistics": also with the
    # LayerNorm statistics over the kept channels (an inexact removal, :class:`Inexact`)
    reference: str = "zeroed"

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "scale": self.scale, "reference": self.reference}


@dataclass(frozen=True)
class Inexact:
    """A removal that changes statistics over channels (LayerNorm): how many removed units, in how many groups, why,
    and (when verified) how far the output moved from the original with those channels zeroed but its statistics
    over every channel (``max_abs``, ``max_rel``, ``cosine``, ``top1_agreement``): the error the removal itself
    introduces, which repairs and fine-tuning then recover."""

    units: int
    groups: int
    reason: str
    error: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"units": self.units, "groups": self.groups, "reason": self.reason}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class LatencyReport:
    """What a prune knows about speed: the engine; the latency table's reference and stated error and its
    prediction (with a table); the interleaved measurement against the original; the closed loop (a latency
    target)."""

    engine: str | None
    reference_ms: float | None = None
    table_error: float | None = None
    predicted: float | None = None
    measured: Measured | None = None
    loop: Loop | None = None

    def to_json(self, *, timings: bool = True) -> dict[str, Any]:
        """As recorded; without ``timings`` the measurement and the loop (they describe the machine) are left out."""
        out: dict[str, Any] = {"engine": self.engine}
        if self.reference_ms is not None:
            out["table"] = {"reference_ms": self.reference_ms, "error": self.table_error}
            out["predicted"] = self.predicted
        if timings and self.measured is not None:
            out["measured"] = self.measured.to_json()
        if timings and self.loop is not None:
            out["loop"] = self.loop.to_json()
        return out


@dataclass
class PruneReport(Cut):
    """A finished prune: the :class:`Cut` (the pruned ``model``, the channels removed, the cost before and after) and
    what was asked and done on the way."""

    target: Target | None = None  # what was asked
    criterion: str = "manual"
    allocator: str = "manual"
    options: dict[str, Any] = field(default_factory=dict)  # the plan's options as recorded (ratio, round_to, ...)
    repairs: dict[str, int] = field(default_factory=dict)  # per repair, what it did (fused channels, layers refit)
    calibration: dict[str, Any] | None = None  # the calibration data, described
    verify: Verified | None = None
    inexact: Inexact | None = None  # the removal changed LayerNorm statistics (not exact), and by how much
    warnings: list[str] = field(default_factory=list)
    latency: LatencyReport | None = None

    @classmethod
    def of(cls, done: Cut, plan: Plan, target: Target, **rest: Any) -> PruneReport:
        """The report of surgery ``done`` on ``plan``, made for ``target``; ``rest``: the other fields."""
        return cls(
            **vars(done),
            target=target,
            criterion=plan.criterion,
            allocator=plan.allocator,
            options=plan.options,
            **rest,
        )

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else 1.0

    @property
    def params_ratio(self) -> float:
        return self.after.params / self.before.params if self.before.params else 1.0

    @property
    def round_to(self) -> int:
        return int(self.options.get("round_to", 1))

    @property
    def achieved(self) -> float | None:
        """The MAC or parameter fraction a MAC or parameter target reached (as planned)."""
        return self.options.get(f"achieved_{self.target.kind}")

    @property
    def predicted_latency(self) -> float | None:
        return self.options.get("predicted_latency")

    @property
    def widths_from_table(self) -> bool:
        """Whether the widths came from a latency table (a budget allocator under a latency target), not from
        ``round_to``."""
        return self.target.kind == "latency" and self.allocator in ("latency", "knapsack")

    def describe_amount(self) -> str:
        """How much was asked for, in words: ``l1, uniform ratio 0.5`` or ``l1, uniform to MACs 0.745 for target
        0.75`` (with a target, the allocator's bisected ratio is not what was removed: chunks are given back
        afterwards, so it is not shown)."""
        head = f"{self.criterion}, {self.allocator}"
        t = self.target
        if t.kind in ("macs", "params"):
            label = "MACs" if t.kind == "macs" else "params"
            return f"{head} to {label} {self.achieved:.3g} for target {t.value:g}"
        if t.kind == "latency":
            asked = self.options.get("target_latency", t.value)
            to = f" to predicted latency {self.predicted_latency:.3g}" if self.predicted_latency is not None else ""
            return f"{head}{to} for latency target {asked:.3g}"
        return f"{head} ratio {self.options.get('ratio', t.value):.3g}"

    def to_json(self, *, timings: bool = True) -> dict[str, Any]:
        """The summary (``carve prune --json``; the ``carve.prune`` history entry)."""
        out: dict[str, Any] = {
            "criterion": self.criterion,
            "allocator": self.allocator,
            "options": self.options,
            "channels_before": self.channels_before,
            "channels_removed": self.channels_removed,
            "units_removed": self.units_removed,
            "groups_touched": self.groups_touched,
            "params_before": self.before.params,
            "macs_before": self.before.macs,
            "params_after": self.after.params,
            "macs_after": self.after.macs,
        }
        if self.repairs:
            out["repairs"] = self.repairs
        if self.calibration is not None:
            out["calibration"] = self.calibration
        if self.verify is not None:
            out["verify"] = self.verify.to_json()
        if self.inexact is not None:
            out["inexact"] = self.inexact.to_json()
        if self.warnings:
            out["warnings"] = self.warnings
        if self.latency is not None:
            out["latency"] = self.latency.to_json(timings=timings)
        return out

    def recorded(self) -> dict[str, Any]:
        """What the model's history keeps: all of the summary, except that under ``SOURCE_DATE_EPOCH`` (a
        reproducible build) the timings measured on this machine are left out: they describe the machine, not the
        model, and would make two identical prunes differ byte for byte."""
        return self.to_json(timings=not os.environ.get("SOURCE_DATE_EPOCH"))
