"""Exact fusion of a pruned filter into a kept one (APBM / SFP "merging"; papers.md section 6).

Information-fusion pruning (APBM, Computer Engineering and Applications 58(24), 2022) fuses unimportant kernels into
important ones, and SFP (Information Sciences 2024) merges the redundant filters of a cluster. Post-training and on
the graph, the exact case is: if the augmented (BN-folded) filter of a removed channel j is a positive multiple of a
kept channel i's, w_j = alpha w_i with alpha > 0, and every op between the producer and the consumers is positively
homogeneous per channel (ReLU, LeakyReLU, identity, max/average pools, flatten, resize, concat, spatial pad/slice),
then y_j = alpha y_i everywhere, so the consumers lose nothing when they add alpha times column j to column i:
V[:, i] += alpha V[:, j]. alpha* = <w_i, w_j> / ||w_i||^2; fusion happens only when the relative residual
||w_j - alpha w_i|| / ||w_j|| is below ``gate`` (exact multiples pass any positive gate).

Applied between planning and surgery (``carve prune --repair exact``, registered repair ``exact``); channels coupled
with others (a residual stream) are not fused.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.config import bounds
from carve.pipeline.graph.bn import folded_filters, following_bn
from carve.pipeline.graph.channels import Kind
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.plan import Plan
from carve.pipeline.pruning.repair import Repair, RepairResult, repairs

HOMOGENEOUS = {
    "Relu",
    "LeakyRelu",
    "Identity",
    "Dropout",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Flatten",
    "Reshape",
    "Resize",
    "Concat",
    "Pad",
    "Slice",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
}
CONSUMERS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}


def _path_ok(model: Model, start: str, allowed_bn: str | None) -> bool:
    """Everything reachable from ``start`` before a consumer is positively homogeneous per channel."""
    stack, seen = [start], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in model.output_names:
            return False
        for u in model.consumers.get(t, []):
            if u.op_type in CONSUMERS and u.input[0] == t:
                continue
            if u.name == allowed_bn or u.op_type in HOMOGENEOUS:
                if u.op_type == "Pad" and any(
                    model.array(u.input[2]) != 0
                    if len(u.input) > 2 and u.input[2] and model.is_const(u.input[2])
                    else [False]
                ):
                    return False  # a nonzero pad value breaks homogeneity
                stack.extend(o for o in u.output if o)
                continue
            return False
    return True


def fuse_exact(model: Model, plan: Plan, working: Model, *, gate: float = 1e-3) -> tuple[list[str], int]:
    """Let ``working``'s consumers absorb every removed channel of ``model`` that is a positive multiple of a kept one
    (the removed columns are read from ``model``: the working model may have them zeroed already)."""
    an = plan.analysis
    out = working
    removed = plan.removed
    members = np.bincount(an.unit_of, minlength=an.n_units)  # elements per unit
    details, fused = [], 0
    in_records = [r for r in an.slice_records if r.role == "in"]
    for src in an.producers((Kind.OUT,)):
        units = an.source_units(src)
        rm = np.flatnonzero(removed[units] & (members[units] == 1))
        keep = np.flatnonzero(~removed[units] & (members[units] == 1))
        if not len(rm) or not len(keep):
            continue
        node = model.nodes[src.name]
        bn = following_bn(model, node.output[0])
        if not _path_ok(model, node.output[0], bn.name if bn is not None else None):
            continue
        w = folded_filters(an, src, with_bias=True)
        wk = w[keep]
        norms2 = (wk * wk).sum(1)
        for j in rm:
            alphas = (wk @ w[j]) / np.where(norms2 > 0, norms2, np.inf)
            resid = np.linalg.norm(w[j][None, :] - alphas[:, None] * wk, axis=1) / max(np.linalg.norm(w[j]), 1e-30)
            resid[alphas <= 0] = np.inf
            best = int(np.argmin(resid))
            if resid[best] > gate:
                continue
            i, alpha = int(keep[best]), float(alphas[best])
            ej, ei = src.start + int(j), src.start + i
            for rec in in_records:
                pj, pi = np.flatnonzero(rec.ids == ej), np.flatnonzero(rec.ids == ei)
                if not len(pj):
                    continue
                arr = np.moveaxis(np.array(out.array(rec.tensor), dtype=np.float64), rec.axis, 0)
                removed_cols = np.moveaxis(model.array(rec.tensor), rec.axis, 0)[pj]
                arr[pi] += alpha * removed_cols
                arr[pj] = 0.0
                out.set_array(rec.tensor, np.moveaxis(arr, 0, rec.axis).astype(out.array(rec.tensor).dtype))
            fused += 1
            details.append(
                f"{src.name}: channel {j} fused into channel {i} (alpha {alpha:.4g}, residual {resid[best]:.2e})"
            )
    return details, fused


@repairs.register("exact")
class ExactFusion(Repair):
    description = "fold removed filters that are positive multiples of kept ones into the consumers (exact)"
    options = {"gate": 1e-3}  # largest relative residual (1e-3: practically exact multiples)
    limits = {"gate": bounds(ge=0)}

    def apply(self, original, plan, working, calib=None, *, progress=None) -> RepairResult:
        details, fused = fuse_exact(original, plan, working, gate=float(self.opts["gate"]))
        return RepairResult(working, details, {"fused_channels": fused}, counts={"fused_channels": fused})
