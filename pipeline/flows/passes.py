"""Running passes on a model file: load, run the passes with their instruments (numeric check), record each in the
model's history, save atomically next to nothing it read. What ``carve decompose``, ``carve merge`` and
``carve sparsify`` do; recipes run passes through :mod:`carve.pipeline.flows.recipe`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carve.pipeline.graph.io import check_output_path, load, save
from carve.pipeline.graph.model import Model
from carve.pipeline.passes import NumericCheck, Pass, PassContext, PassManager, PassResult, record_pass
from carve.pipeline.runtime.ort import check_runs


@dataclass
class PassRun:
    before: Model
    after: Model
    passes: list[Pass]
    results: list[PassResult]

    def summary(self) -> list[dict[str, Any]]:
        return [
            {
                "pass": p.name,
                "exact": p.exact,
                "changed": r.changed,
                **r.summary,
                "error": r.error,
                "seconds": round(r.seconds, 3),
                "details": r.details,
            }
            for p, r in zip(self.passes, self.results)
        ]


def run_passes(
    source: str | Path,
    output: str | Path,
    passes: list[Pass],
    *,
    model: Model | None = None,
    calib: Any = None,
    seed: int = 0,
    command: str | None = None,
) -> PassRun:
    """Run ``passes`` on the model at ``source`` (or the already loaded ``model`` read from it) and write ``output``."""
    check_output_path(output, source)
    model = model if model is not None else load(source)
    ctx = PassContext(calib=calib, seed=seed, command=command)
    final, results = PassManager(passes, [NumericCheck()]).run(model, ctx)
    if not any(r.changed for r in results):
        check_runs(final)  # nothing changed, so nothing was checked: the file written must still run
    for p, r in zip(passes, results):
        record_pass(final, p, r, ctx.command)
    save(final, output, check_inputs=[source])
    return PassRun(model, final, passes, results)
