"""Bias correction: after pruning, each consumer's bias absorbs the mean shift of its output,
b' = b_orig + E[W_orig X_orig] - E[W_K X_K] per output channel, where W_K and X_K are the working model's kept
weights and inputs (after another repair, e.g. lsq, it corrects only what that repair left). From input means only
(cheaper than the least-squares refit; the mean-shift correction of data-free quantisation and pruning work, e.g.
Nagel et al. ICCV 2019). In topological order on calibration data (:mod:`carve.pipeline.data.compensate`).

A 2-D convolution's output mean is its weight applied to the mean *patch*: per input channel and kernel offset, the
mean of the input over the positions that offset reads (padding zeros included). On centred images (digits) that
differs from the channel mean, which reads every position equally; with channel means the corrected output means of
LeNet-5's second convolution were off by half their size. Other consumers (Gemm, MatMul, grouped or 1-D/3-D
convolutions) use feature or channel means."""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.compensate import compensate
from carve.pipeline.data.im2col import conv_geometry
from carve.pipeline.graph.consumers import add_bias, bias_vector, consumer_columns, weight_matrix
from carve.pipeline.graph.model import Model, attr
from carve.pipeline.pruning.repair import Repair, RepairResult, repairs


class _BiasCorrection:
    needs_original = True

    def __init__(self, original: Model, cols: dict) -> None:
        self.original, self.cols = original, cols
        self.sums: dict[str, list] = {}  # sum over the original's inputs, over the working model's, values per channel

    def tensors(self, node) -> list[str]:
        return [node.input[0]]

    original_tensors = tensors

    def _channel_sums(self, node, v: np.ndarray) -> tuple[np.ndarray, int]:
        """Sums of the inputs the node multiplies, and how many rows they sum: per channel and kernel offset for a
        2-D convolution (C x kh x kw), else per channel or feature."""
        if _patch_means(node, v):
            return _patch_sums(self.original, node, v)
        axis = 1 if node.op_type == "Conv" else v.ndim - 1
        return v.sum(axis=tuple(a for a in range(v.ndim) if a != axis), dtype=np.float64), v.size // v.shape[axis]

    def observe(self, node, batch: int, original: dict) -> None:
        acc = self.sums.setdefault(node.name, [0.0, 0.0, 0])
        s, n = self._channel_sums(node, original[node.input[0]])
        acc[0], acc[2] = acc[0] + s, acc[2] + n

    def accumulate(self, node, batch: int, working: dict) -> None:
        acc = self.sums.setdefault(node.name, [0.0, 0.0, 0])
        acc[1] = acc[1] + self._channel_sums(node, working[node.input[0]])[0]

    @staticmethod
    def _per_channel(node, w: np.ndarray, channels: int) -> np.ndarray:
        """Cout x channels: a Conv's weight summed over its kernel positions (the weight of a channel's mean)."""
        return w.reshape(w.shape[0], channels, w.shape[1] // channels).sum(-1) if node.op_type == "Conv" else w

    def finish(self, node, model: Model) -> str:
        weight, axis, keep = self.cols[node.name]
        s_o, s_w, n = self.sums.pop(node.name)
        mu_o, mu_w = s_o / n, s_w / n
        # target: the original's output mean; now: the working model's, with its own (possibly already repaired)
        # weights and bias, so a chained repair (lsq then bias) corrects what is left instead of undoing the refit
        if mu_o.ndim == 3:  # mean patches (C x kh x kw) of a 2-D convolution, weights Cout x C x kh x kw
            target = np.tensordot(self.original.array(weight).astype(np.float64), mu_o, axes=3)
            now = np.tensordot(model.array(weight).astype(np.float64)[:, keep], mu_w[keep], axes=3)
        else:
            target = self._per_channel(node, weight_matrix(self.original, node, weight, axis), len(keep)) @ mu_o
            now = self._per_channel(node, weight_matrix(model, node, weight, axis), len(keep))[:, keep] @ mu_w[keep]
        count = len(target)
        delta = target + bias_vector(self.original, node, count) - now - bias_vector(model, node, count)
        add_bias(model, node, delta)
        return f"{node.name}: bias corrected (mean shift {float(np.abs(delta).mean()):.3g})"


def _patch_means(node, v: np.ndarray) -> bool:
    return node.op_type == "Conv" and v.ndim == 4 and int(attr(node, "group", 1)) == 1


def _patch_sums(model: Model, node, v: np.ndarray) -> tuple[np.ndarray, int]:
    """Per input channel and kernel offset (u, v): the sum over the batch and the output positions of the input that
    offset reads (the column sums of the im2col matrix, without building it), and the number of rows."""
    g = conv_geometry(model, node, v.shape)
    top, left, bottom, right = g["pads"]
    x = np.pad(v, ((0, 0), (0, 0), (top, bottom), (left, right)))
    sums = np.empty((v.shape[1], g["kh"], g["kw"]))
    for u in range(g["kh"]):
        for w in range(g["kw"]):
            y0, x0 = u * g["dh"], w * g["dw"]
            window = x[
                :, :, y0 : y0 + g["sh"] * (g["oh"] - 1) + 1 : g["sh"], x0 : x0 + g["sw"] * (g["ow"] - 1) + 1 : g["sw"]
            ]
            sums[:, u, w] = window.sum(axis=(0, 2, 3), dtype=np.float64)
    return sums, v.shape[0] * g["oh"] * g["ow"]


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
