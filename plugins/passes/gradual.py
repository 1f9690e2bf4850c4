"""Gradual pruning: alternate prune and fine-tune steps toward a MAC or latency target, each step pruning the
fine-tuned result of the last (progressive pruning as SFP, Information Sciences 2024, and most structured-pruning
papers train: remove a little, recover, repeat; cf. Zhu and Gupta, "To prune, or not to prune", 2017, for the gradual
schedule).

Step k keeps ``keep_k`` of the input model's MACs: with ``per_step: f`` each step removes the fraction f of the MACs
left (``keep_k = (1 - f)^k``) until ``target_macs``; with ``steps: n`` the steps are geometric, ``keep_k =
target^(k/n)``. Every step prunes with the ``prune`` options (criterion, allocator, alignment, repair) to that fraction
and fine-tunes with the ``finetune`` options, distilling from the model the run started from. Each step's MACs,
parameters, accuracy on the recipe's ``data: eval`` and model file (under the run's ``.steps`` folder) are in the
report.

With ``target_latency`` (a fraction of the input model's latency on the prune options' backend) the schedule is the
same in latency: step k aims at ``target^(k/n)`` of the input's latency, each step prunes with the latency allocator
and closed loop (``carve prune --target-latency``) toward the part of that budget the steps so far have not used, as
measured on the engine, and each step's measured latency ratio is in the report.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.io import save
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.evaluate import evaluate
from carve.pipeline.measure.oracle import MeasuredLatency
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.pruning.prune import PruneOptions, legacy_repairs, prune_model
from carve.pipeline.pruning.targets import Target
from carve.pipeline.training.finetune import finetune
from carve.pipeline.training.options import finetune_options


def keep_schedule(
    target: float, *, steps: int | None = None, per_step: float | None = None, kind: str = "macs"
) -> list[float]:
    """The MAC (or latency) fractions of the input model the steps keep, the last one ``target``."""
    if not 0 < target < 1:
        raise CarveError(f"gradual: target_{kind} must be in (0, 1), got {target}")
    if (steps is None) == (per_step is None):
        raise CarveError(f"gradual: give steps (how many) or per_step (fraction of the {kind} each step removes)")
    if steps is not None:
        if steps < 1:
            raise CarveError(f"gradual: steps must be at least 1, got {steps}")
        return [target ** ((k + 1) / steps) for k in range(steps)]
    if not 0 < per_step < 1:
        raise CarveError(f"gradual: per_step must be in (0, 1), got {per_step}")
    n = max(1, math.ceil(math.log(target) / math.log(1 - per_step) - 1e-9))
    return [max(target, (1 - per_step) ** (k + 1)) for k in range(n)]


@passes.register("gradual")
class Gradual(Pass):
    description = "alternate prune and fine-tune steps toward a MAC or latency target (progressive pruning)"
    records_history = True

    def __init__(
        self,
        target_macs: float | None = None,
        steps: int | None = None,
        per_step: float | None = None,
        prune: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        target_latency: float | None = None,
    ) -> None:
        where = "pass 'gradual': prune"
        prune = legacy_repairs(dict(prune or {}), where=where)
        for key in ("target_macs", "target_params", "target_latency", "ratio"):
            if key in prune:
                raise CarveError(f"{where}.{key} is set by the schedule; give gradual's target_macs or target_latency")
        if target_macs is not None and target_latency is not None:
            raise CarveError("pass 'gradual': give target_macs or target_latency, not both")
        try:
            if target_latency is not None:
                target = Target.parse("latency", target_latency)
            else:
                target = Target.parse("macs", 0.5 if target_macs is None else target_macs)
        except CarveError as exc:
            raise CarveError(f"pass 'gradual': {exc.message}", hint=exc.hint) from None
        if target.absolute:
            raise CarveError("pass 'gradual': target_latency is a fraction of the input's latency here, not a time")
        self.kind = target.kind
        self.keep = keep_schedule(target.value, steps=steps, per_step=per_step, kind=self.kind)
        self.base = PruneOptions.from_mapping(prune, where=where)  # validated now, not after hours of training
        self.ft_opts, self.teacher = finetune_options(finetune or {}, "pass 'gradual': finetune")
        self.ft_opts.check()

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"train", "calib"} if self.base.data_needed() else {"train"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        teacher = ctx.original if self.teacher == "original" else None
        macs0 = model_cost(model).macs
        current, steps, details = model, [], []
        latency_ratio = 1.0  # measured latency of the current model / the input's (the product of the steps')
        for k, keep in enumerate(self.keep, 1):
            if self.kind == "latency":  # of the current model's latency, as measured so far
                opts = replace(self.base, target_latency=min(keep / latency_ratio, 1.0))
                oracle = MeasuredLatency.for_options(opts, progress=ctx.progress)
                report = prune_model(current, opts, calib=ctx.calib, command=ctx.command, latency=oracle)
                latency_ratio *= report.latency.measured.ratio
            else:
                fraction = keep * macs0 / model_cost(current).macs  # of the current model's MACs
                opts = replace(self.base, target_macs=min(fraction, 1.0))
                report = prune_model(current, opts, calib=ctx.calib, command=ctx.command)
            pruned = report.model
            tuned = finetune(pruned, ctx.train, self.ft_opts, teacher=teacher, eval_data=None, command=ctx.command)
            current = tuned.model
            cost = model_cost(current)
            step: dict[str, Any] = {
                "step": k,
                f"keep_{self.kind}": keep,
                "macs": cost.macs,
                "macs_ratio": cost.macs / macs0,
                "params": cost.params,
                "channels_removed": report.channels_removed,
                **({"latency_ratio": latency_ratio} if self.kind == "latency" else {}),
                "finetune": {"steps": tuned.summary["steps"], "seconds": tuned.summary["seconds"]},
            }
            if ctx.eval is not None:
                step["top1_pruned"] = evaluate(pruned, ctx.eval).get("top1")
                step["top1"] = evaluate(current, ctx.eval).get("top1")
            if ctx.workdir is not None:
                ctx.workdir.mkdir(parents=True, exist_ok=True)
                step["model"] = str(save(current, ctx.workdir / f"step{k}.onnx"))
            steps.append(step)
            acc = f", top-1 {step['top1_pruned']:.2%} pruned -> {step['top1']:.2%} fine-tuned" if "top1" in step else ""
            lat = f", latency {latency_ratio:.1%} (measured)" if self.kind == "latency" else ""
            details.append(f"step {k}: MACs {step['macs_ratio']:.1%}{lat} of the input{acc}")
        return PassResult(current, True, details, {"steps": steps, "schedule": self.keep})
