"""The whole pruning operation, shared by ``carve prune``, the ``prune`` pass of recipes and the Python API:

    analyse -> plan (criterion + allocator, ratio or MAC/param target) -> repairs ([exact fusion] [lsq refit]
    [bias correction | BN re-estimation]) -> surgery -> verification

Criteria, allocators and repairs are reached through their registries. Repairs work on a *working* copy of the model
whose removed consumer columns are zeroed, so verification is always the same statement: the pruned model equals the
(repaired) working model in ONNX Runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import options_for
from pipeline.errors import CarveError
from pipeline.graph.channels import analyse
from pipeline.graph.history import record
from pipeline.graph.model import Model
from pipeline.graph.rewrite import ensure_biases
from pipeline.graph.surgery import prune, zero_removed
from pipeline.pruning.criterion import criteria
from pipeline.pruning.planner import plan
from pipeline.pruning.repair import repairs
from pipeline.runtime.verify import verify_equal


@dataclass
class PruneOptions:
    criterion: str = "l1"
    ratio: float = 0.5
    target_macs: float | None = None
    target_params: float | None = None
    allocator: str = "uniform"
    round_to: int = 1
    keep_min: int = 1
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    criterion_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    fuse: str | None = None  # "exact" | "lsq"
    repair: str | None = None  # "bias" | "bn"
    ridge: float = 1e-3
    fuse_gate: float = 1e-3
    verify: bool = True

    def plan_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pipeline.pruning.planner.plan` these options set."""
        return {**options_for(plan, asdict(self)), **self.allocator_options}

    def repair_steps(self) -> list[tuple[str, dict[str, Any]]]:
        """The repairs to run, in order, with their options (registry name, options)."""
        steps: list[tuple[str, dict[str, Any]]] = []
        if self.fuse == "exact":
            steps.append(("exact", {"gate": self.fuse_gate}))
        elif self.fuse == "lsq":
            steps.append(("lsq", {"ridge": self.ridge}))
        if self.repair:
            steps.append((self.repair, {}))
        return steps

    def data_needed(self) -> str | None:
        """Who needs calibration data under these options (for messages), or None when nothing does."""
        needs = sorted(criteria.get(self.criterion).needs & {"activations", "labels", "gradients"})
        if needs:
            return f"criterion {self.criterion!r} ({', '.join(needs)})"
        for name, _ in self.repair_steps():
            if "calib" in repairs.get(name).needs:
                return "--fuse lsq" if name == "lsq" else f"--repair {name}"
        return None

    def check(self, calib: Any) -> None:
        if self.fuse not in (None, "exact", "lsq"):
            raise CarveError(f"--fuse must be exact or lsq, got {self.fuse!r}")
        if self.repair not in (None, "bias", "bn"):
            raise CarveError(f"--repair must be bias or bn, got {self.repair!r}")
        who = self.data_needed()
        if who and calib is None:
            raise CarveError(f"{who} needs calibration data", hint="give --calib FILE.npz | FOLDER | digits")


def prune_model(
    model: Model,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    inplace: bool = False,
    progress=None,
) -> tuple[Model, dict]:
    """Prune ``model`` as ``opts`` says; returns the pruned model and a summary (also stored in its metadata)."""
    opts.check(calib)
    if not inplace:
        model = model.copy()
    steps = opts.repair_steps()
    if any(name in ("lsq", "bias") for name, _ in steps):
        ensure_biases(model)  # the refit's intercept needs a bias that is cut with its layer
    analysis = analyse(model)
    p = plan(analysis, calib=calib, **opts.plan_options())
    repaired: dict[str, Any] = {}
    work = zero_removed(model, p) if steps else model
    for name, options in steps:
        result = repairs.get(name)(**options).apply(model, p, work, calib, progress=progress)
        work = result.model
        repaired["fused_channels" if name == "exact" else name] = (
            result.stats["fused_channels"] if name == "exact" else len(result.details)
        )
    reference = zero_removed(work, p) if opts.verify else None
    pruned = prune(work, p, command=command, inplace=True)
    summary = json.loads(pruned.metadata()["carve.prune"])
    if repaired:
        summary["repairs"] = repaired
    if calib is not None:
        summary["calibration"] = calib.describe()
    if reference is not None:
        summary["verify"] = verify_equal(reference, pruned)
    record(pruned, "prune", summary, command=command, replace_last=True)
    return pruned, summary


def options_dict(opts: PruneOptions) -> dict:
    return asdict(opts)
