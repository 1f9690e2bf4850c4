"""INT8 measured, not assumed: how far a quantized model's outputs are from the FP32 model's, and which nodes to keep in
FP32 to stay within a budget.

:func:`output_agreement` compares the FP32 and INT8 outputs on the same inputs (per output: max and mean absolute error,
relative to the FP32 output's largest magnitude; for a classifier's (N x classes) output: top-1 agreement and, with
labels, the top-1 of both). :func:`drop_points` turns that into the number a budget is stated in: accuracy points lost
with labels, else points of top-1 disagreement, else (no classifier output) the mean error in percent of the output's
range.

:func:`keep_fp32_search` (``keep_fp32: auto``) measures per-node sensitivity by quantizing one compute node at a time
(every other node FP32) and taking the normalised mean squared error of the outputs, ranks the nodes, then finds by
bisection the smallest number of the most sensitive nodes to keep in FP32 so that the drop is within ``max_drop``. The
search assumes the drop falls as more nodes are kept; every model it measured is listed, so a reader can see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.runtime.ort import session
from carve.pipeline.runtime.quantize import Quantizer


def outputs_on(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], rows: list[int]) -> list[np.ndarray]:
    """Every output of ``model`` over the feeds, concatenated (only the first ``rows[k]`` rows of batch ``k``: padded
    rows of a static-batch model are cut)."""
    sess = session(model, threads=1)
    outs: list[list[np.ndarray]] = []
    for feed, n in zip(feeds, rows):
        for k, y in enumerate(sess.run(None, feed)):
            if len(outs) <= k:
                outs.append([])
            outs[k].append(np.asarray(y)[:n])
    return [np.concatenate(o) for o in outs]


def _is_classifier(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.shape[1] > 1 and np.issubdtype(y.dtype, np.floating)


def output_agreement(
    fp32: list[np.ndarray], int8: list[np.ndarray], names: list[str], labels: np.ndarray | None = None
) -> dict[str, Any]:
    """FP32 against INT8 on the same inputs (see module docstring)."""
    per: dict[str, Any] = {}
    for name, a, b in zip(names, fp32, int8):
        if not np.issubdtype(a.dtype, np.floating):
            per[name] = {"exact_match": float((a == b).mean())}
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a64 - b64)
        scale = float(np.abs(a64).max()) or 1.0
        d = {
            "max_abs_error": float(diff.max()),
            "mean_abs_error": float(diff.mean()),
            "max_rel_error": float(diff.max() / scale),
            "mean_rel_error": float(diff.mean() / scale),
        }
        if _is_classifier(a):
            d["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
            if labels is not None and len(labels) == len(a):
                d["top1_fp32"] = float((a.argmax(1) == labels).mean())
                d["top1_int8"] = float((b.argmax(1) == labels).mean())
        per[name] = d
    return {"samples": int(len(fp32[0])) if fp32 else 0, "outputs": per}


def drop_points(agreement: dict[str, Any]) -> tuple[float, str]:
    """(drop in points, what it measures) for the first float output (see module docstring)."""
    first = next((v for v in agreement["outputs"].values() if "mean_rel_error" in v), None)
    if first is None:
        return 0.0, "no float output"
    if "top1_int8" in first:
        return 100 * (first["top1_fp32"] - first["top1_int8"]), "top-1 accuracy points lost"
    if "top1_agreement" in first:
        return 100 * (1 - first["top1_agreement"]), "points of top-1 disagreement with FP32"
    return 100 * first["mean_rel_error"], "mean error in % of the FP32 output's range"


def sensitivity_score(fp32: list[np.ndarray], int8: list[np.ndarray]) -> float:
    """Normalised mean squared error summed over the float outputs (0 = identical)."""
    total = 0.0
    for a, b in zip(fp32, int8):
        if np.issubdtype(a.dtype, np.floating):
            a64 = a.astype(np.float64)
            total += float(((a64 - b.astype(np.float64)) ** 2).mean() / max(a64.var(), 1e-12))
    return total


@dataclass
class KeepResult:
    model: onnx.ModelProto
    kept: list[dict[str, Any]] = field(default_factory=list)  # node, op, why
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # node, op, score, rank
    tried: list[dict[str, Any]] = field(default_factory=list)  # kept count, drop
    met: bool = True
    drop: float = 0.0
    measure: str = ""


def keep_fp32_search(
    q: Quantizer,
    feeds: list[dict[str, np.ndarray]],
    rows: list[int],
    labels: np.ndarray | None,
    *,
    max_drop: float,
    manual: list[str],
    sensitivity_rows: int = 64,
    progress=None,
) -> KeepResult:
    """Quantize with ``manual`` nodes kept FP32, then keep the most sensitive nodes FP32 until the drop on ``feeds``
    is within ``max_drop`` points (see module docstring)."""
    names = [o.name for o in q.model.graph.output]
    fp32 = outputs_on(q.model, feeds, rows)

    def measure(exclude: list[str]) -> tuple[onnx.ModelProto, float, str]:
        proto = q.quantize(exclude=exclude)
        d, what = drop_points(output_agreement(fp32, outputs_on(proto, feeds, rows), names, labels))
        return proto, d, what

    proto, drop, what = measure(manual)
    res = KeepResult(proto, [{"node": n, "why": "asked for (`keep_fp32`)"} for n in manual], drop=drop, measure=what)
    res.tried.append({"kept_auto": 0, "drop": drop})
    if drop <= max_drop:
        return res
    # per-node sensitivity on a subset: each compute node quantized alone
    sub_feeds, sub_rows, seen = [], [], 0
    for f, n in zip(feeds, rows):
        if seen >= sensitivity_rows:
            break
        sub_feeds.append(f)
        sub_rows.append(n)
        seen += n
    ref = [o[:seen] for o in fp32]
    cands = [n for n in q.candidates() if n.name not in manual]
    scores = []
    for k, node in enumerate(cands):
        if progress:
            progress("per-node sensitivity", k, len(cands))
        one = q.quantize(include=[node.name])
        scores.append(sensitivity_score(ref, outputs_on(one, sub_feeds, sub_rows)))
    order = sorted(range(len(cands)), key=lambda i: -scores[i])
    res.sensitivity = [
        {"node": cands[i].name, "op": cands[i].op_type, "nmse": scores[i], "rank": r + 1} for r, i in enumerate(order)
    ]
    ranked = [cands[i].name for i in order]
    # bisection on the number kept: lo fails the budget, hi meets it
    lo, hi = 0, len(ranked)
    best = None
    proto_hi, drop_hi, _ = measure(manual + ranked)
    res.tried.append({"kept_auto": hi, "drop": drop_hi})
    if drop_hi > max_drop:
        res.model, res.drop, res.met = proto_hi, drop_hi, False
        k_final = hi
    else:
        best = (hi, proto_hi, drop_hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p, d, _ = measure(manual + ranked[:mid])
            res.tried.append({"kept_auto": mid, "drop": d})
            if d <= max_drop:
                hi, best = mid, (mid, p, d)
            else:
                lo = mid
        k_final, res.model, res.drop = best
    for r, name in enumerate(ranked[:k_final]):
        s = res.sensitivity[r]
        res.kept.append(
            {
                "node": name,
                "op": s["op"],
                "why": f"sensitivity rank {r + 1} of {len(ranked)} (NMSE {s['nmse']:.3g} quantized alone)",
            }
        )
    return res


def check_budget(max_drop: float) -> None:
    if not max_drop >= 0:
        raise CarveError(f"`max_drop` must be >= 0 points, got {max_drop}")
