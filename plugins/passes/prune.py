"""Pruning as a pass, for recipes: plan with a criterion and an allocator (a ratio, or a MAC, parameter or latency
target), repair, cut, and measure the result against its input on the options' backend (see
carve.pipeline.pruning.prune; ``measure: false`` skips the measurement)."""

from __future__ import annotations

from typing import Any

from carve.pipeline.config import from_mapping
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.latency import MeasuredLatency
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.pruning.prune import PruneOptions, describe_amount, prune_model


@passes.register("prune")
class Prune(Pass):
    description = "remove channels: criterion + allocator, optional fusion/refit/repair (carve.pipeline.pruning.prune)"
    records_history = True

    def __init__(self, **options: Any) -> None:
        if "ratio" in options and {"target_macs", "target_params"} & set(options):
            target = sorted({"target_macs", "target_params"} & set(options))[0]
            raise CarveError(f"pass 'prune': give ratio or {target}, not both (a target finds its own ratio)")
        self.opts = from_mapping(PruneOptions, options, where="pass 'prune'")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"calib"}) if self.opts.data_needed() else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        latency = MeasuredLatency.for_options(self.opts, progress=ctx.progress)
        pruned, summary = prune_model(
            model, self.opts, calib=ctx.calib, command=ctx.command, progress=ctx.progress, latency=latency
        )
        details = [
            f"removed {summary['channels_removed']} of {summary['channels_before']} channels "
            f"({describe_amount(summary)})",
            *summary.get("warnings", []),
        ]
        measured = (summary.get("latency") or {}).get("measured")
        if measured:
            details.append(
                f"measured on {summary['latency']['engine']}: {measured['speedup']:.2f}x the speed of its input "
                f"(latency ratio {measured['ratio']:.3f})"
            )
        return PassResult(pruned, summary["channels_removed"] > 0, details, summary)
