"""Unstructured and 2:4 weight sparsity (the ``sparsify`` pass, ``carve sparsify``): zero the least important weights,
keep every shape.

Zeroed weights shrink a compressed file and feed sparse kernels (NVIDIA's 2:4 structured sparsity on Ampere and
later, through TensorRT), but dense kernels run exactly as fast as before: carve reports sparsity here, never a
speed-up. Importance per weight: CEP's cross-entropy error (|g w| or the Fisher term, on labelled data) or the
magnitude |w|. Patterns:

* ``unstructured``: CEP's grouped thresholds (per filter: zero s_w < lambda * mean of the filter, keep HCEP's top
  fraction), lambda bisected to reach the requested sparsity over all Conv/Gemm/MatMul weights;
* ``2:4``: in every group of 4 consecutive input channels of a filter, the 2 least important weights are zeroed
  (50% sparsity, the layout sparse tensor cores accept); layers whose input channels are not a multiple of 4 are left
  dense and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from carve.pipeline.data.gradients import weight_gradients
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.precision import refuse_quantized
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.pruning.scoring import weight_mask, weight_scores


@dataclass
class SparsifyResult:
    model: Model
    sparsity: float  # zeros / weights over the layers considered
    layers: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def linear_weights(model: Model) -> list[tuple[str, str, int]]:
    """(node, weight, output axis) of every Conv / Gemm / MatMul with a constant weight."""
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and model.is_const(n.input[1]):
            if n.op_type == "Conv":
                axis = 0
            elif n.op_type == "Gemm":
                axis = 0 if next((a.i for a in n.attribute if a.name == "transB"), 0) else 1
            else:
                axis = 1
            out.append((n.name, n.input[1], axis))
    return out


def importance(model: Model, criterion: str, data=None, variant: str = "taylor") -> dict[str, np.ndarray]:
    weights = {w for _, w, _ in linear_weights(model)}
    if criterion == "magnitude":
        return {w: np.abs(model.array(w)).astype(np.float64) for w in weights}
    if criterion == "cep":
        if data is None:
            raise CarveError("sparsify `criterion=cep` needs labelled calibration data", hint="add `calib` DATA")
        grads = weight_gradients(model, data, names=sorted(weights))
        return {w: weight_scores(grads, w, model.array(w), variant) for w in weights if w in grads.mean}
    raise CarveError(f"sparsify: unknown criterion {criterion!r}; valid: cep, magnitude")


def sparsify(
    model: Model,
    *,
    sparsity: float = 0.5,
    criterion: str = "magnitude",
    pattern: str = "unstructured",
    hcep: float = 0.0,
    data=None,
    variant: str = "taylor",
) -> SparsifyResult:
    if pattern not in ("unstructured", "2:4"):
        raise CarveError(f"sparsify: pattern must be unstructured or 2:4, got {pattern!r}")
    if not 0 < sparsity < 1:
        raise CarveError(f"sparsify: sparsity must be in (0, 1), got {sparsity}")
    out = model.copy()
    scores = importance(model, criterion, data, variant)
    layers = [(n, w, a) for n, w, a in linear_weights(out) if w in scores]
    masks: dict[str, np.ndarray] = {}
    skipped: list[str] = []
    if pattern == "2:4":
        for node, w, axis in layers:
            s = scores[w]
            in_axis = 1 if axis == 0 else 0
            if s.shape[in_axis] % 4:
                skipped.append(f"{node}: {s.shape[in_axis]} input channels are not a multiple of 4")
                continue
            moved = np.moveaxis(s, in_axis, -1)  # groups of 4 along the input channels
            groups = moved.reshape(*moved.shape[:-1], -1, 4)
            order = np.argsort(groups, axis=-1)
            keep = np.ones_like(groups, dtype=bool)
            np.put_along_axis(keep, order[..., :2], False, axis=-1)
            masks[w] = np.moveaxis(keep.reshape(moved.shape), -1, in_axis)
    else:

        def total_sparsity(lam: float) -> float:
            zeros = sum(int((~weight_mask(out.array(w), scores[w], a, lam, hcep)).sum()) for _, w, a in layers)
            return zeros / max(sum(scores[w].size for _, w, _ in layers), 1)

        lo, hi = 0.0, 1.0
        while total_sparsity(hi) < sparsity and hi < 1e6:
            hi *= 2
        for _ in range(40):
            mid = (lo + hi) / 2
            if total_sparsity(mid) < sparsity:
                lo = mid
            else:
                hi = mid
        masks = {w: weight_mask(out.array(w), scores[w], a, hi, hcep) for _, w, a in layers}
    per_layer, zeros, total = {}, 0, 0
    for node, w, _ in layers:
        arr = out.array(w)
        if w in masks:
            arr = np.where(masks[w], arr, 0).astype(arr.dtype)
            out.set_array(w, arr)
        z = int((arr == 0).sum())
        per_layer[node] = z / arr.size
        zeros += z
        total += arr.size
    return SparsifyResult(out, zeros / max(total, 1), per_layer, skipped)


@passes.register("sparsify")
class Sparsify(Pass):
    description = "zero the least important weights (magnitude or CEP; unstructured or 2:4); shapes unchanged"
    warn_below_cosine = 0.95
    low_cosine_hint = "zero fewer weights (a lower `sparsity`), or repair / fine-tune"

    def __init__(
        self,
        sparsity: float = 0.5,
        criterion: str = "magnitude",
        pattern: str = "unstructured",
        hcep: float = 0.0,
        variant: str = "taylor",
    ) -> None:
        self.options = {"sparsity": sparsity, "criterion": criterion, "pattern": pattern, "hcep": hcep}
        self.options["variant"] = variant

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"calib"}) if self.options["criterion"] == "cep" else frozenset()

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        refuse_quantized(model, "sparsify")
        res = sparsify(model, data=ctx.calib, **self.options)
        summary = {
            "criterion": self.options["criterion"],
            "pattern": self.options["pattern"],
            "sparsity": res.sparsity,
            "layers": res.layers,
            "skipped": res.skipped,
            "note": "zeroed weights; no dense-kernel speed-up is claimed",
        }
        details = [f"left dense: {s}" for s in res.skipped]
        return PassResult(res.model, res.sparsity > 0, details, summary)
