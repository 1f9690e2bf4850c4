"""Pruning as a pass, for recipes: plan with a criterion and an allocator (a ratio, or a MAC, parameter or latency
target), repair, cut, and measure the result against its input on the options' backend (see
carve.pipeline.pruning.prune; ``measure: false`` skips the measurement)."""

from __future__ import annotations

from typing import Any

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.oracle import MeasuredLatency
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.pruning.prune import PruneOptions, prune_model


@passes.register("prune")
class Prune(Pass):
    description = "remove channels: criterion + allocator, then the repairs given (carve.pipeline.pruning.prune)"
    records_history = True

    def __init__(self, **options: Any) -> None:
        targets = sorted({"target_macs", "target_params", "target_latency"} & set(options))
        if "ratio" in options and targets:
            raise CarveError(f"pass 'prune': give ratio or {targets[0]}, not both (a target finds its own ratio)")
        self.opts = PruneOptions.from_mapping(options, where="pass 'prune'")
        self.opts.target()  # one target, valid: refused now, not when the pass runs

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"calib"}) if self.opts.data_needed() else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        latency = MeasuredLatency.for_options(self.opts, progress=ctx.progress)
        report = prune_model(
            model, self.opts, calib=ctx.calib, command=ctx.command, progress=ctx.progress, latency=latency
        )
        details = [
            f"removed {report.channels_removed} of {report.channels_before} channels ({report.describe_amount()})",
            *report.warnings,
        ]
        measured = report.latency.measured if report.latency else None
        if measured:
            details.append(
                f"measured on {report.latency.engine}: {measured.speedup:.2f}x the speed of its input "
                f"(latency ratio {measured.ratio:.3f})"
            )
        return PassResult(report.model, report.channels_removed > 0, details, report.to_json())
