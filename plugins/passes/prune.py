"""Pruning as a pass, for recipes: plan with a criterion and an allocator, repair, cut (see pipeline.pruning.prune)."""

from __future__ import annotations

from typing import Any

from pipeline.graph import Model
from pipeline.passes import Pass, PassContext, PassResult, passes
from pipeline.pruning.prune import PruneOptions, prune_model


@passes.register("prune")
class Prune(Pass):
    description = "remove channels: criterion + allocator, optional fusion/refit/repair (pipeline.pruning.prune)"

    def __init__(self, **options: Any) -> None:
        from dataclasses import fields

        from pipeline.errors import CarveError

        valid = {f.name for f in fields(PruneOptions)}
        unknown = set(options) - valid
        if unknown:
            raise CarveError(f"pass 'prune' has no option {sorted(unknown)[0]!r}; valid: {', '.join(sorted(valid))}")
        self.opts = PruneOptions(**options)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        from pipeline.pruning.criterion import criteria

        data = bool(criteria.get(self.opts.criterion).needs & {"activations", "labels", "gradients"})
        return frozenset({"calib"}) if data or self.opts.fuse == "lsq" or self.opts.repair else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        pruned, summary = prune_model(model, self.opts, calib=ctx.calib, command=ctx.command)
        details = [
            f"removed {summary['channels_removed']} of {summary['channels_before']} channels "
            f"({summary['criterion']}, {summary['allocator']}, ratio {summary['options']['ratio']:.3g})"
        ]
        return PassResult(pruned, summary["channels_removed"] > 0, details, summary)
