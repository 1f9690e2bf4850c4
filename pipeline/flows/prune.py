"""``carve prune`` as a flow: a loaded model, options and calibration data in; the pruned model written atomically
(never over an input) and its summary out. The pruning itself is :func:`pipeline.pruning.prune.prune_model`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.graph.io import save
from pipeline.graph.model import Model
from pipeline.progress import Progress
from pipeline.pruning.prune import PruneOptions, prune_model


def prune_file(
    model: Model,
    output: str | Path,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Prune ``model`` (loaded from its file; changed in place) and save the result to ``output``."""
    pruned, summary = prune_model(model, opts, calib=calib, command=command, inplace=True, progress=progress)
    save(pruned, output, check_inputs=[model.source])
    return summary
