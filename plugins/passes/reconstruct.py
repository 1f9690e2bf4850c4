"""Repair what pruning lost without training: least-squares refit of the consumers, bias correction, BN re-estimation.

All three run between planning and surgery on the *working* model (the original with the removed channels' consumer
columns zeroed, which computes exactly what the pruned model will) and use :mod:`pipeline.compensate` to go level by
level, so each layer is repaired for the inputs it will really see.

* ``lsq`` (ThiNet, Luo et al. ICCV 2017; channel pruning, He et al. ICCV 2017; papers.md section 6): for each consumer
  (Conv via its im2col patches, Gemm/MatMul via its rows; a depthwise conv upstream is simply part of the input), the
  kept columns and the bias are refit by ridge regression so the consumer's output on the working model's inputs
  matches the original consumer's output on the original inputs:
  min_{W', b'} ||W X_orig - W'_K X_K - b'||^2 + ridge ||W'_K||^2. The plain pruned weights are one candidate, so on
  the calibration data the refit's error never exceeds plain pruning's (up to the ridge term).
* ``bias`` (bias correction): b' = b + E[W X_orig] - E[W_K X_K] per output channel, from channel means only.
* ``bn`` (BN re-estimation): every BatchNormalization's mean and variance are re-measured on the working model.

Statistics are accumulated batch by batch (Gram matrices and means): memory does not grow with the samples.
"""

from __future__ import annotations

import numpy as np
import onnx

from pipeline.calib import Dataset
from pipeline.compensate import run_levels
from pipeline.errors import CarveError
from pipeline.graph import Model
from pipeline.graph import attr as _attr
from pipeline.planning import Plan
from pipeline.rewrite import rows
from pipeline.surgery import zero_removed


def _consumer_columns(plan: Plan) -> dict[str, tuple[str, int, np.ndarray]]:
    """node -> (weight, axis, kept mask over the weight's input axis) for consumers that lose columns."""
    an = plan.analysis
    out = {}
    for rec in an.slice_records:
        if rec.role != "in":
            continue
        keep = ~plan.removed[an.unit_of[rec.ids]]
        if keep.all():
            continue
        node = an.model.nodes[rec.node]
        if node.op_type == "Gemm" and (float(_attr(node, "alpha", 1.0)) != 1 or float(_attr(node, "beta", 1.0)) != 1):
            continue  # scaled Gemms keep plain pruning
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            out[rec.node] = (rec.tensor, rec.axis, keep)
    return out


def _weight_matrix(model: Model, node: onnx.NodeProto, weight: str, axis: int) -> np.ndarray:
    """The consumer as a matrix acting on input rows (patches or features): Cout x D."""
    w = model.array(weight).astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    return w.T if axis == 0 else w  # Gemm transB=0 / MatMul: [K, N]; Gemm transB=1: [N, K]


def _write_matrix(model: Model, node: onnx.NodeProto, weight: str, axis: int, m: np.ndarray) -> None:
    dtype = model.array(weight).dtype
    shape = model.array(weight).shape
    arr = m.reshape(shape) if node.op_type == "Conv" else (m.T if axis == 0 else m)
    model.set_array(weight, arr.astype(dtype))


def _add_bias(model: Model, node: onnx.NodeProto, delta: np.ndarray) -> None:
    if node.op_type == "MatMul":
        return  # no bias input: the intercept is dropped (documented limitation)
    if not (len(node.input) > 2 and node.input[2]):
        raise CarveError(
            f"{node.op_type} {node.name!r} has no bias to take the correction",
            hint="call pipeline.rewrite.ensure_biases(model) before analysing (carve prune does)",
        )
    b = model.array(node.input[2])
    model.set_array(node.input[2], (b.astype(np.float64) + delta.reshape(b.shape)).astype(b.dtype))


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
        w = _weight_matrix(self.original, node, weight, axis).astype(np.float32)
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
        w = _weight_matrix(model, node, weight, axis)
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
        _write_matrix(model, node, weight, axis, new)
        _add_bias(model, node, sol[d])
        return f"{node.name}: refit {int(k.sum())} of {len(k)} input columns by least squares"


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
        w = _weight_matrix(self.original, node, weight, axis)
        inner = w.shape[1] // len(keep)
        per_ch = w.reshape(w.shape[0], len(keep), inner).sum(-1) if node.op_type == "Conv" else w
        delta = per_ch @ mu_o - per_ch[:, keep] @ mu_w[keep]
        _add_bias(model, node, delta)
        return f"{node.name}: bias corrected (mean shift {float(np.abs(delta).mean()):.3g})"


class _BNStats:
    def __init__(self) -> None:
        self.acc: dict[str, list] = {}

    def tensors(self, node) -> list[str]:
        return [node.input[0]]

    def update(self, node, original, working) -> None:
        v = working[node.input[0]]
        m = np.moveaxis(v, 1, -1).reshape(-1, v.shape[1]).astype(np.float64)
        a = self.acc.setdefault(node.name, [0, 0, 0])
        a[0], a[1], a[2] = a[0] + m.sum(0), a[1] + (m * m).sum(0), a[2] + len(m)

    def finish(self, node, model: Model) -> str:
        s, sq, n = self.acc.pop(node.name)
        mean = s / n
        var = np.maximum(sq / n - mean**2, 0.0)
        for name, val in ((node.input[3], mean), (node.input[4], var)):
            model.set_array(name, val.astype(model.array(name).dtype))
        return f"{node.name}: statistics re-estimated on {n} values per channel"


def reconstruct(
    model: Model,
    plan: Plan,
    data: Dataset,
    *,
    method: str = "lsq",
    ridge: float = 1e-3,
    working: Model | None = None,
    progress=None,
) -> tuple[Model, list[str], dict]:
    """The working model (removed columns zeroed, consumers repaired) ready for surgery, report lines, statistics."""
    work = working if working is not None else zero_removed(model, plan)
    cols = _consumer_columns(plan)
    stats: dict = {}
    if method == "lsq":
        job = _LSQ(model, cols, ridge)
        details = run_levels(model, work, cols, job, data, progress=progress)
        stats["errors"] = job.errors
    elif method == "bias":
        details = run_levels(model, work, cols, _BiasCorrection(model, cols), data, progress=progress)
    elif method == "bn":
        bns = [
            n.name
            for n in work.graph.node
            if n.op_type == "BatchNormalization" and all(work.is_const(i) for i in n.input[1:5])
        ]
        details = run_levels(model, work, bns, _BNStats(), data, progress=progress)
    else:
        raise CarveError(f"unknown reconstruction {method!r}; valid: lsq, bias, bn")
    return work, details, stats
