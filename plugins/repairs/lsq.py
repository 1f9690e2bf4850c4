"""Least-squares refit of the consumers (ThiNet, Luo et al. ICCV 2017; channel pruning, He et al. ICCV 2017;
papers.md section 6).

For each consumer that loses input columns (Conv via its im2col patches, Gemm/MatMul via its rows; a depthwise conv
upstream is simply part of the input), the kept columns and the bias are refit by ridge regression so the consumer's
output on the working model's inputs matches the original consumer's output on the original inputs:
min_{W', b'} ||W X_orig - W'_K X_K - b'||^2 + ridge ||W'_K||^2. The plain pruned weights are one candidate, so on the
calibration data the refit's error never exceeds plain pruning's (up to the ridge term). Layers are processed level by
level (:mod:`pipeline.data.compensate`), so each is refit for the inputs it will really see; statistics are Gram
matrices accumulated batch by batch, so memory does not grow with the samples.
"""

from __future__ import annotations

import numpy as np
import onnx

from pipeline.data.compensate import run_levels
from pipeline.data.im2col import rows
from pipeline.graph.consumers import add_bias, consumer_columns, weight_matrix, write_matrix
from pipeline.graph.model import Model
from pipeline.pruning.repair import Repair, RepairResult, repairs


class _LSQ:
    # rows (patch positions) per batch: neighbouring positions are highly redundant, and the Gram products dominate
    max_rows = 32768

    def __init__(self, original: Model, cols: dict, ridge: float, seed: int = 0) -> None:
        self.original, self.cols, self.ridge = original, cols, ridge
        self.rng = np.random.default_rng(seed)
        self.gram: dict[str, np.ndarray] = {}
        self.cross: dict[str, np.ndarray] = {}
        self.errors: dict[str, tuple[float, float]] = {}

    def tensors(self, node: onnx.NodeProto) -> list[str]:
        return [node.input[0]]

    def update(self, node, original, working) -> None:
        weight, axis, keep = self.cols[node.name]
        w = weight_matrix(self.original, node, weight, axis).astype(np.float32)
        inner = w.shape[1] // len(keep)  # kernel positions per channel (1 for Gemm)
        k = np.repeat(keep, inner) if node.op_type == "Conv" else keep
        f_orig = rows(self.original, node, original[node.input[0]])
        f_work = rows(self.original, node, working[node.input[0]])
        if len(f_orig) > self.max_rows:  # the same rows from both models
            pick = self.rng.choice(len(f_orig), self.max_rows, replace=False)
            f_orig, f_work = f_orig[pick], f_work[pick]
        target = f_orig @ w.T  # the original outputs (without bias)
        feats = np.concatenate([f_work[:, k], np.ones((len(f_work), 1), np.float32)], axis=1)  # intercept -> bias
        # float32 products, float64 accumulation and solve
        self.gram[node.name] = self.gram.get(node.name, 0) + (feats.T @ feats).astype(np.float64)
        self.cross[node.name] = self.cross.get(node.name, 0) + (feats.T @ target).astype(np.float64)

    def finish(self, node, model: Model) -> str:
        weight, axis, keep = self.cols[node.name]
        g, c = self.gram.pop(node.name), self.cross.pop(node.name)
        d = len(g) - 1
        lam = self.ridge * max(float(np.trace(g[:d, :d])) / max(d, 1), 1e-12)
        reg = lam * np.eye(len(g))
        reg[d, d] = 0.0  # do not shrink the bias
        sol = np.linalg.solve(g + reg, c)  # (D_K + 1) x Cout
        w = weight_matrix(model, node, weight, axis)
        inner = w.shape[1] // len(keep)
        k = np.repeat(keep, inner) if node.op_type == "Conv" else keep
        plain = w[:, k].T

        # calibration error of plain pruning vs the refit (same features, same targets): e = c0 - 2 tr(X^T Y) + ...
        # (computed from the Gram matrices: ||Y - F B||^2 = ||Y||^2 - 2 tr(B^T F^T Y) + tr(B^T F^T F B))
        def quad(b: np.ndarray) -> float:
            return float(np.trace(b.T @ g @ b) - 2 * np.trace(b.T @ c))

        plain_full = np.concatenate([plain, np.zeros((1, plain.shape[1]))], axis=0)
        self.errors[node.name] = (quad(plain_full), quad(sol))
        new = np.zeros_like(w)
        new[:, k] = sol[:d].T
        write_matrix(model, node, weight, axis, new)
        add_bias(model, node, sol[d])
        return f"{node.name}: refit {int(k.sum())} of {len(k)} input columns by least squares"


@repairs.register("lsq")
class LeastSquares(Repair):
    description = "refit the consumers' kept columns and bias by ridge regression on calibration data (ThiNet/CP)"
    needs = frozenset({"calib"})
    options = {"ridge": 1e-3}

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        cols = consumer_columns(plan)
        job = _LSQ(original, cols, float(self.opts["ridge"]))
        details = run_levels(original, working, cols, job, calib, progress=progress)
        return RepairResult(working, details, {"errors": job.errors})
