"""``carve prune`` as a flow: a loaded model, options and calibration data in; the pruned model written atomically
(never over an input) and its report out. The pruning itself is :func:`carve.pipeline.pruning.prune.prune_model`; this
flow gives it the measurements (:class:`carve.pipeline.measure.oracle.MeasuredLatency` on the options' backend): the
latency table of a latency target, the closed loop, and the quick A/B of the result against the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carve.pipeline.graph.io import save
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.oracle import MeasuredLatency
from carve.pipeline.progress import Progress
from carve.pipeline.pruning.prune import PruneOptions, prune_model
from carve.pipeline.pruning.report import PruneReport


def prune_measured(
    model: Model,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    inplace: bool = False,
    progress: Progress | None = None,
) -> PruneReport:
    """:func:`~carve.pipeline.pruning.prune.prune_model` with measurements on ``opts.backend`` (the Python API of
    ``carve prune``): a latency target works, and the report's ``latency`` says how fast the result is.
    ``progress`` (:mod:`carve.pipeline.progress`) hears every stage, profiling and measuring included."""
    latency = MeasuredLatency.for_options(opts, progress=progress)  # a progress callback takes a bare stage too
    return prune_model(model, opts, calib=calib, command=command, inplace=inplace, progress=progress, latency=latency)


def prune_file(
    model: Model,
    output: str | Path,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    progress: Progress | None = None,
) -> PruneReport:
    """Prune ``model`` (loaded from its file; changed in place) and save the result to ``output``."""
    report = prune_measured(model, opts, calib=calib, command=command, inplace=True, progress=progress)
    save(report.model, output, check_inputs=[model.source])
    return report
