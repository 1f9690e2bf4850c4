"""Static INT8 quantization (the ``quantize`` pass, ``carve quantize``): a QDQ model written by ONNX Runtime's own
quantizer (:mod:`carve.pipeline.runtime.quantize`: per-channel symmetric INT8 weights, per-tensor activations,
minmax / entropy / percentile calibration), with its loss measured on the calibration data and, with
``keep_fp32: auto``, the most sensitive nodes kept in FP32 until the drop is within ``max_drop`` points
(:mod:`carve.pipeline.measure.quantization`).

Prune first, then quantize: the result is a QDQ graph that ``carve prune`` refuses. Quantization-aware training is not
done (post-training quantization only).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from carve.pipeline.data.batching import model_batches
from carve.pipeline.errors import CarveError, first_line
from carve.pipeline.graph.io import from_proto
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.quantization import (
    check_budget,
    drop_points,
    keep_fp32_search,
    output_agreement,
    outputs_on,
)
from carve.pipeline.passes import Pass, PassContext, PassResult, passes
from carve.pipeline.runtime.quantize import Quantizer, QuantSettings, ort_kernels


def calibration_feeds(model: Model, data, batch: int = 32) -> tuple[list[dict[str, np.ndarray]], list[int], Any]:
    """The calibration data as feeds the model accepts (its static batch, or ``batch``), real rows per feed and the
    labels of those rows (None without labels)."""
    name = model.input_names[0]
    feeds, rows, labels = [], [], []
    for x, y, n in model_batches(model, data, batch, pad_last=True):
        feeds.append({name: x})
        rows.append(n)
        if y is not None:
            labels.append(y[:n])
    if not feeds:
        raise CarveError(f"{data.name}: holds no samples", hint="give calibration data with at least one sample")
    from carve.pipeline.runtime.ort import session

    try:
        session(model).run(None, feeds[0])
    except Exception as exc:
        raise CarveError(
            f"{data.name}: calibration data of shape {list(feeds[0][name].shape)} does not fit "
            f"{model.source or 'the model'} ({first_line(exc)})",
            hint="give data of the model's input size (and channels)",
        ) from None
    return feeds, rows, (np.concatenate(labels) if labels else None)


def weight_bytes(proto) -> int:
    from carve.pipeline.graph.model import tensor_nbytes

    return sum(tensor_nbytes(t) for t in proto.graph.initializer)


@passes.register("quantize")
class Quantize(Pass):
    description = (
        "INT8 (QDQ) through ONNX Runtime's quantizer: per-channel weights, per-tensor activations; agreement with "
        "FP32 measured; keep_fp32: auto keeps the most sensitive nodes FP32 within max_drop points"
    )
    needs = frozenset({"calib"})

    def __init__(
        self,
        method: str = "minmax",
        keep_fp32: list[str] | str | None = None,
        max_drop: float = 0.5,
        activations: str = "uint8",
        per_channel: bool = True,
        reduce_range: bool = False,
        include: list[str] | None = None,
        check_kernels: bool = True,
    ) -> None:
        self.settings = QuantSettings(method, activations, per_channel, reduce_range)
        self.settings.check()
        check_budget(max_drop)
        if isinstance(keep_fp32, str):
            keep_fp32 = [keep_fp32]
        self.keep = list(keep_fp32 or [])
        self.auto = "auto" in self.keep
        self.keep = [k for k in self.keep if k != "auto"]
        self.max_drop = float(max_drop)
        self.include = list(include) if include else None
        self.check_kernels = check_kernels
        if self.auto and self.include:
            raise CarveError("`keep_fp32=auto` chooses the FP32 nodes itself; leave `include` out")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        feeds, rows, labels = calibration_feeds(model, ctx.calib)
        with Quantizer(model, feeds, self.settings) as q:
            manual = q.check_nodes(self.keep, "keep_fp32")
            include = q.check_nodes(self.include, "include") if self.include else None
            names = [o.name for o in q.model.graph.output]
            if self.auto:
                found = keep_fp32_search(
                    q, feeds, rows, labels, max_drop=self.max_drop, manual=manual, progress=ctx.progress
                )
                proto, kept, sensitivity, tried = found.model, found.kept, found.sensitivity, found.tried
            else:
                proto = q.quantize(exclude=manual, include=include)
                kept = [{"node": n, "why": "asked for (`keep_fp32`)"} for n in manual]
                sensitivity, tried = [], []
            agreement = output_agreement(
                outputs_on(q.model, feeds, rows), outputs_on(proto, feeds, rows), names, labels
            )
            candidates = [n.name for n in q.candidates()]
        drop, measure = drop_points(agreement)
        dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        int8_nodes = [n.name for n in proto.graph.node if n.name in candidates and n.input[1] in dq_out]
        summary: dict[str, Any] = {
            **self.settings.describe(),
            "calibration_samples": int(sum(rows)),
            "compute_nodes": len(candidates),
            "int8_compute_nodes": len(int8_nodes),
            "kept_fp32": kept,
            "budget": {"max_drop": self.max_drop, "drop": drop, "measure": measure, "met": drop <= self.max_drop},
            "agreement": {**agreement, "data": f"{ctx.calib.name} (the calibration data)"},
            "weight_bytes": {"fp32": weight_bytes(model.proto), "int8": weight_bytes(proto)},
            "qat": "not done (post-training quantization only)",
        }
        if self.auto:
            summary["sensitivity"] = sensitivity[:50]
            summary["search"] = tried
        if self.check_kernels:
            summary["kernels"] = ort_kernels(proto)
        details = [f"kept FP32: {k['node']}: {k['why']}" for k in kept]
        first = next(iter(agreement["outputs"].items()))
        details.append(f"{first[0]}: " + ", ".join(f"{k} {v:.4g}" for k, v in first[1].items()))
        details.append(f"drop {drop:.3g} ({measure}; budget {self.max_drop:g})")
        if not summary["budget"]["met"]:
            from carve.pipeline.errors import warn

            warn(
                f"quantize: the drop {drop:.3g} ({measure}) is above `max_drop` {self.max_drop:g}"
                + (" even with every compute node kept FP32" if self.auto else "; try `keep_fp32=auto`")
            )
        out = from_proto(proto)
        out.external_data = model.external_data
        return PassResult(out, True, details, summary)
