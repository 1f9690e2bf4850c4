"""Bias correction: after pruning, each consumer's bias absorbs the mean shift of its output,
b' = b + E[W X_orig] - E[W_K X_K] per output channel, from channel means only (cheaper than the least-squares refit;
the mean-shift correction of data-free quantisation and pruning work, e.g. Nagel et al. ICCV 2019). Level by level
on calibration data (:mod:`pipeline.data.compensate`)."""

from __future__ import annotations

import numpy as np

from pipeline.data.compensate import run_levels
from pipeline.graph.consumers import add_bias, consumer_columns, weight_matrix
from pipeline.graph.model import Model
from pipeline.pruning.repair import Repair, RepairResult, repairs


class _BiasCorrection:
    def __init__(self, original: Model, cols: dict) -> None:
        self.original, self.cols = original, cols
        self.sums: dict[str, list] = {}

    def tensors(self, node) -> list[str]:
        return [node.input[0]]

    def update(self, node, original, working) -> None:
        axis_c = 1 if node.op_type == "Conv" else -1
        for key, v in (("o", original[node.input[0]]), ("w", working[node.input[0]])):
            m = np.moveaxis(v, axis_c, -1).reshape(-1, v.shape[axis_c]).astype(np.float64)
            acc = self.sums.setdefault(node.name, [0, 0, 0])
            idx = 0 if key == "o" else 1
            acc[idx] = acc[idx] + m.sum(0)
            if key == "o":
                acc[2] += len(m)

    def finish(self, node, model: Model) -> str:
        weight, axis, keep = self.cols[node.name]
        s_o, s_w, n = self.sums.pop(node.name)
        mu_o, mu_w = s_o / n, s_w / n
        w = weight_matrix(self.original, node, weight, axis)
        inner = w.shape[1] // len(keep)
        per_ch = w.reshape(w.shape[0], len(keep), inner).sum(-1) if node.op_type == "Conv" else w
        delta = per_ch @ mu_o - per_ch[:, keep] @ mu_w[keep]
        add_bias(model, node, delta)
        return f"{node.name}: bias corrected (mean shift {float(np.abs(delta).mean()):.3g})"


@repairs.register("bias")
class BiasCorrection(Repair):
    description = "correct each consumer's bias for the mean shift of its output (calibration data)"
    needs = frozenset({"calib"})

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        cols = consumer_columns(plan)
        details = run_levels(original, working, cols, _BiasCorrection(original, cols), calib, progress=progress)
        return RepairResult(working, details)
