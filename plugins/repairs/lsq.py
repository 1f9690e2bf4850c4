"""Least-squares refit of the consumers (ThiNet, Luo et al. ICCV 2017; channel pruning, He et al. ICCV 2017;
papers.md section 6).

For each consumer that loses input columns (Conv via its im2col rows, Gemm/MatMul via its feature rows; a depthwise
conv upstream is simply part of the input), the kept columns and the bias are refit by ridge regression so the
consumer's output on the working model's inputs matches the original consumer's output on the original inputs:
min_{W', b'} ||W X_orig - W'_K X_K - b'||^2 + ridge ||W'_K||^2. The plain pruned weights are one candidate, so on the
calibration data the refit's error never exceeds plain pruning's (up to the ridge term). Consumers are refit in
topological order on inputs that carry every upstream refit (:mod:`carve.pipeline.data.compensate`).

Per batch and consumer at most ``max_rows`` rows (patch positions: neighbours are highly redundant) are drawn, the
same in both models, seeded per (node, batch). The targets are read off the original consumer's *output*, which ONNX
Runtime computes anyway (no im2col on that side); the working model's rows are gathered directly, kept input channels
only (:func:`carve.pipeline.data.im2col.patch_rows`). Statistics are Gram matrices accumulated batch by batch (float32
products, float64 sums and solve), so memory does not grow with the samples.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx

from carve.pipeline.config import bounds
from carve.pipeline.data.compensate import compensate
from carve.pipeline.data.im2col import from_uvc, patch_rows, uvc_matrix
from carve.pipeline.graph.consumers import add_bias, bias_vector, consumer_columns, weight_matrix, write_matrix
from carve.pipeline.graph.model import Model
from carve.pipeline.pruning.repair import Repair, RepairResult, repairs


def _matrix(model: Model, node: onnx.NodeProto, weight: str, axis: int) -> np.ndarray:
    """The consumer as Cout x D acting on :func:`patch_rows` rows (Conv columns in (u, v, c) order)."""
    if node.op_type == "Conv":
        return uvc_matrix(model.array(weight).astype(np.float64))
    return weight_matrix(model, node, weight, axis)


def _kept_columns(node: onnx.NodeProto, d: int, keep: np.ndarray) -> np.ndarray:
    """The kept columns of a D-column consumer matrix in :func:`patch_rows` order ((u, v) major, channel minor)."""
    return np.tile(keep, d // len(keep)) if node.op_type == "Conv" else keep


class _LSQ:
    max_rows = 32768
    needs_original = True

    def __init__(self, original: Model, cols: dict, ridge: float, seed: int = 0) -> None:
        self.original, self.cols, self.ridge, self.seed = original, cols, ridge, seed
        self.acc: dict[str, list] = {}  # F^T F, 1^T F, n, F^T Y, 1^T Y, ||Y||^2
        self.pending: dict[tuple[str, int], tuple[np.ndarray | None, np.ndarray]] = {}
        self.errors: dict[str, tuple[float, float]] = {}  # (plain, refit) calibration error, up to ||Y||^2
        self.target_energy: dict[str, float] = {}  # ||Y||^2: error + this = the squared residual

    def tensors(self, node: onnx.NodeProto) -> list[str]:
        return [node.input[0]]

    def original_tensors(self, node: onnx.NodeProto) -> list[str]:
        return [node.output[0]]

    def _pick(self, node: onnx.NodeProto, batch: int, total: int) -> np.ndarray | None:
        if total <= self.max_rows:
            return None
        # deterministic per (node, batch) whatever order a runner visits them in; sorted for memory locality
        rng = np.random.default_rng([self.seed, zlib.crc32(node.name.encode()), batch])
        return np.sort(rng.choice(total, self.max_rows, replace=False))

    def observe(self, node: onnx.NodeProto, batch: int, original: dict[str, np.ndarray]) -> None:
        y = original[node.output[0]]  # rows in (n, oy, ox) order, like the patches
        y = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]) if node.op_type == "Conv" else y.reshape(-1, y.shape[-1])
        pick = self._pick(node, batch, len(y))
        target = np.array(y if pick is None else y[pick], dtype=np.float32)
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            target -= self.original.array(node.input[2]).astype(np.float32).reshape(-1)  # outputs without the bias
        self.pending[(node.name, batch)] = (pick, target)

    def accumulate(self, node: onnx.NodeProto, batch: int, working: dict[str, np.ndarray]) -> None:
        _, _, keep = self.cols[node.name]
        pick, target = self.pending.pop((node.name, batch))
        feats = patch_rows(self.original, node, working[node.input[0]], pick, keep)
        a = self.acc.setdefault(node.name, [0.0, 0.0, 0, 0.0, 0.0, 0.0])
        ones = np.ones(len(feats), np.float32)  # column sums as GEMVs: the intercept's rows of the Gram matrix
        a[0] = a[0] + (feats.T @ feats).astype(np.float64)
        a[1] = a[1] + (ones @ feats).astype(np.float64)
        a[2] += len(feats)
        a[3] = a[3] + (feats.T @ target).astype(np.float64)
        a[4] = a[4] + (ones @ target).astype(np.float64)
        a[5] += float(np.einsum("ij,ij->", target, target, dtype=np.float64))

    def finish(self, node: onnx.NodeProto, model: Model) -> str:
        weight, axis, keep = self.cols[node.name]
        ff, fs, n, fy, ys, yy = self.acc.pop(node.name)
        d = len(ff)
        g = np.zeros((d + 1, d + 1))
        g[:d, :d], g[:d, d], g[d, :d], g[d, d] = ff, fs, fs, n
        c = np.concatenate([fy, ys[None]], axis=0)
        lam = self.ridge * max(float(np.trace(ff)) / max(d, 1), 1e-12)
        reg = lam * np.eye(d + 1)
        reg[d, d] = 0.0  # do not shrink the bias
        sol = np.linalg.solve(g + reg, c)  # (D_K + 1) x Cout
        w = _matrix(model, node, weight, axis)
        k = _kept_columns(node, w.shape[1], keep)

        # calibration error of plain pruning vs the refit (same features, same targets), up to the constant ||Y||^2:
        # ||Y - F B||^2 = ||Y||^2 - 2 tr(B^T F^T Y) + tr(B^T F^T F B)
        def quad(b: np.ndarray) -> float:
            return float(np.sum(b * (g @ b)) - 2 * np.sum(b * c))

        plain = np.concatenate([w[:, k].T, np.zeros((1, w.shape[0]))], axis=0)
        self.errors[node.name] = (quad(plain), quad(sol))
        self.target_energy[node.name] = yy
        new = np.zeros_like(w)
        new[:, k] = sol[:d].T
        if node.op_type == "Conv":
            model.set_array(weight, from_uvc(new, model.array(weight).shape).astype(model.array(weight).dtype))
        else:
            write_matrix(model, node, weight, axis, new)
        # the intercept was fitted to the original's outputs without the original's bias: the new bias is
        # b_orig + intercept, whatever an earlier repair left in the working model's bias
        add_bias(
            model, node, bias_vector(self.original, node, w.shape[0]) + sol[d] - bias_vector(model, node, w.shape[0])
        )
        return f"{node.name}: refit {int(k.sum())} of {len(k)} input columns by least squares"


@repairs.register("lsq")
class LeastSquares(Repair):
    description = "refit the consumers' kept columns and bias by ridge regression on calibration data (ThiNet/CP)"
    needs = frozenset({"calib", "biases"})  # the refit's intercept needs a bias that is cut with its layer
    options = {"ridge": 1e-3}  # relative ridge strength
    limits = {"ridge": bounds(ge=0)}

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        cols = consumer_columns(plan)
        job = _LSQ(original, cols, float(self.opts["ridge"]))
        details = compensate(original, working, cols, job, calib, progress=progress, stage=f"{self.name}: layer")
        return RepairResult(working, details, {"errors": job.errors, "target_energy": job.target_energy})
