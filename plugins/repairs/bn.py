"""BatchNorm re-estimation: every BatchNormalization's running mean and variance are re-measured on the working model
(the statistics the pruned network really produces; "AdaBN"-style recalibration, Li et al. 2016), in topological order
on calibration data, one forward pass of the working model (:mod:`carve.pipeline.data.compensate`). A graph whose BN
was folded into its convs gets the same through BNs inserted for the pass and folded back
(:func:`carve.pipeline.training.bn_insert.recalibrate`)."""

from __future__ import annotations

from carve.pipeline.data.capture import ChannelMoments
from carve.pipeline.data.compensate import compensate
from carve.pipeline.graph.model import Model
from carve.pipeline.pruning.repair import Repair, RepairResult, repairs
from carve.pipeline.training import bn_insert


class _BNStats:
    needs_original = False  # only the working model's statistics matter

    def __init__(self) -> None:
        self.moments = ChannelMoments()

    def tensors(self, node) -> list[str]:
        return [node.input[0]]

    def original_tensors(self, node) -> list[str]:
        return []

    def observe(self, node, batch: int, original: dict) -> None:
        pass

    def accumulate(self, node, batch: int, working: dict) -> None:
        self.moments.update(node.name, working[node.input[0]])

    def finish(self, node, model: Model) -> str:
        mean, var, n = self.moments.mean(node.name), self.moments.var(node.name), self.moments.count[node.name]
        for name, val in ((node.input[3], mean), (node.input[4], var)):
            model.set_array(name, val.astype(model.array(name).dtype))
        return f"{node.name}: statistics re-estimated on {n} values per channel"


@repairs.register("bn")
class BatchNormStatistics(Repair):
    description = "re-estimate every BatchNormalization's mean and variance on calibration data"
    needs = frozenset({"calib"})

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        bns = [
            n.name
            for n in working.graph.node
            if n.op_type == "BatchNormalization" and all(working.is_const(i) for i in n.input[1:5])
        ]
        if not any(n.op_type == "BatchNormalization" for n in working.graph.node):
            # an eval-mode export folded its BN into the convs: re-normalise the convs instead
            repaired, n = bn_insert.recalibrate(working, original, calib)
            detail = f"no BatchNormalization (folded): {n} convs re-normalised to the original's channel statistics"
            return RepairResult(repaired, [detail], counts={self.name: n})
        details = compensate(original, working, bns, _BNStats(), calib, progress=progress, stage=f"{self.name}: layer")
        return RepairResult(working, details)
