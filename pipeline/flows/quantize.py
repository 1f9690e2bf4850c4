"""INT8 from Python: what ``carve quantize`` does, as two functions.

    from carve import load, load_data, quantize
    model = load("r56_pruned.onnx")
    calib = load_data("calib.npz", model=model, samples=512)
    int8, summary = quantize(model, calib, keep_fp32="auto", max_drop=0.5)
    print(summary["budget"], summary["kept_fp32"])

:func:`quantize_model` returns the QDQ model (not written) and the pass's summary (settings, agreement with FP32 on the
calibration data, nodes kept in FP32 and why, the integer kernels ONNX Runtime runs); :func:`quantize_file` writes it
atomically with its history, as the command does. Options are the ``quantize`` pass's (``carve plugins`` lists them):
``method`` (minmax | entropy | percentile), ``keep_fp32`` (node patterns, or ``"auto"``), ``max_drop`` (points),
``activations`` (uint8 | int8), ``per_channel``, ``reduce_range``, ``include``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carve.pipeline.flows.passes import run_passes
from carve.pipeline.graph.model import Model
from carve.pipeline.passes import NumericCheck, PassContext, PassManager, build, record_pass


def quantize_model(model: Model, calib: Any, *, command: str | None = None, **options: Any) -> tuple[Model, dict]:
    """The INT8 (QDQ) model of ``model`` calibrated on ``calib`` (a Dataset), its history recorded, and the summary."""
    p = build("quantize", **options)
    ctx = PassContext(calib=calib, command=command)
    final, (result,) = PassManager([p], [NumericCheck()]).run(model, ctx)
    record_pass(final, p, result, command)
    return final, result.summary


def quantize_file(
    source: str | Path, output: str | Path, calib: Any, *, command: str | None = None, **options: Any
) -> dict:
    """Quantize the model at ``source`` into ``output`` (atomic, never over an input); returns the summary."""
    run = run_passes(source, output, [build("quantize", **options)], calib=calib, command=command)
    return run.results[0].summary
