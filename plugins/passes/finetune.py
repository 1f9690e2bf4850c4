"""Distillation fine-tuning as a recipe pass: train the graph's own weights on the recipe's ``data: train``, with the
model the run started from as the teacher (``teacher: none`` to train on labels alone). See
:mod:`carve.pipeline.training.finetune` (distillation: Hinton et al. 2015; variable temperature: SFP, Information
Sciences 2024)."""

from __future__ import annotations

from typing import Any

from carve.pipeline.graph.model import Model
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.training.finetune import finetune
from carve.pipeline.training.options import finetune_options


@passes.register("finetune")
class Finetune(Pass):
    description = "distillation fine-tuning of the graph's own weights on the recipe's training data"
    needs = frozenset({"train"})
    records_history = True

    def __init__(self, **options: Any) -> None:
        self.opts, self.teacher = finetune_options(options, "pass 'finetune'")
        self.opts.check()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        teacher = ctx.original if self.teacher == "original" else None
        result = finetune(
            model, ctx.train, self.opts, teacher=teacher, eval_data=ctx.eval, command=ctx.command, progress=ctx.progress
        )
        s = result.summary
        details = [
            f"epoch {e['epoch']}: loss {e['loss']:.4f}" + (f", top-1 {e['top1']:.2%}" if "top1" in e else "")
            for e in s["history"]
        ]
        details.append(f"{s['steps']} steps, {s['images_per_s']} images/s on {s['device']}")
        return PassResult(result.model, s["steps"] > 0, details, s)
