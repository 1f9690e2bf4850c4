"""Bias correction: after pruning, each consumer's bias absorbs the mean shift of its output,
b' = b + E[W X_orig] - E[W_K X_K] per output channel, from channel means only (cheaper than the least-squares refit;
the mean-shift correction of data-free quantisation and pruning work, e.g. Nagel et al. ICCV 2019). In topological
order on calibration data (:mod:`carve.pipeline.data.compensate`)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.compensate import compensate
from carve.pipeline.graph.consumers import add_bias, consumer_columns, weight_matrix
from carve.pipeline.graph.model import Model
from carve.pipeline.pruning.repair import Repair, RepairResult, repairs


class _BiasCorrection:
    needs_original = True

    def __init__(self, original: Model, cols: dict) -> None:
        self.original, self.cols = original, cols
        self.sums: dict[str, list] = {}  # sum over the original's inputs, over the working model's, values per channel

    def tensors(self, node) -> list[str]:
        return [node.input[0]]

    original_tensors = tensors

    @staticmethod
    def _channel_sums(node, v: np.ndarray) -> tuple[np.ndarray, int]:
        axis = 1 if node.op_type == "Conv" else v.ndim - 1
        return v.sum(axis=tuple(a for a in range(v.ndim) if a != axis), dtype=np.float64), v.size // v.shape[axis]

    def observe(self, node, batch: int, original: dict) -> None:
        acc = self.sums.setdefault(node.name, [0.0, 0.0, 0])
        s, n = self._channel_sums(node, original[node.input[0]])
        acc[0], acc[2] = acc[0] + s, acc[2] + n

    def accumulate(self, node, batch: int, working: dict) -> None:
        acc = self.sums.setdefault(node.name, [0.0, 0.0, 0])
        acc[1] = acc[1] + self._channel_sums(node, working[node.input[0]])[0]

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
    needs = frozenset({"calib", "biases"})

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        cols = consumer_columns(plan)
        details = compensate(
            original,
            working,
            cols,
            _BiasCorrection(original, cols),
            calib,
            progress=progress,
            stage=f"{self.name}: layer",
        )
        return RepairResult(working, details)
