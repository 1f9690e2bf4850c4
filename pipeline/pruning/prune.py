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

from pipeline.config import bounds, options_for, validate
from pipeline.errors import CarveError, warn
from pipeline.graph.channels import analyse
from pipeline.graph.history import record
from pipeline.graph.model import Model, check_finite, nonfinite_initializers
from pipeline.graph.rewrite import ensure_biases
from pipeline.graph.surgery import prune, zero_removed
from pipeline.progress import Progress, counted, silent
from pipeline.pruning.criterion import criteria
from pipeline.pruning.planner import plan
from pipeline.pruning.repair import repairs
from pipeline.runtime.verify import verify_equal


@dataclass
class PruneOptions:
    criterion: str = "l1"
    ratio: float = field(default=0.5, metadata=bounds(ge=0, lt=1))
    target_macs: float | None = field(default=None, metadata=bounds(gt=0, le=1))
    target_params: float | None = field(default=None, metadata=bounds(gt=0, le=1))
    allocator: str = "uniform"
    round_to: int = field(default=1, metadata=bounds(ge=1))
    keep_min: int = field(default=1, metadata=bounds(ge=1))
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    criterion_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    fuse: str | None = field(default=None, metadata=bounds(choices=("exact", "lsq")))
    repair: str | None = field(default=None, metadata=bounds(choices=("bias", "bn")))
    ridge: float = field(default=1e-3, metadata=bounds(ge=0))  # lsq: relative ridge strength
    fuse_gate: float = field(default=1e-3, metadata=bounds(ge=0))  # exact fusion: largest relative residual
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
        validate(self)
        if self.target_macs is not None and self.target_params is not None:
            raise CarveError("give --target-macs or --target-params, not both")
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
    progress: Progress | None = None,
) -> tuple[Model, dict]:
    """Prune ``model`` as ``opts`` says; returns the pruned model and a summary (also stored in its metadata).
    ``progress`` (:mod:`pipeline.progress`) hears every stage: analyse, score, plan, each repair layer by layer,
    surgery, verify."""
    opts.check(calib)
    report = progress or silent
    had_nonfinite = nonfinite_initializers(model)  # the input's own (e.g. a Clip bound of inf) are not ours
    if not inplace:
        model = model.copy()
    steps = opts.repair_steps()
    if any(name in ("lsq", "bias") for name, _ in steps):
        ensure_biases(model)  # the refit's intercept needs a bias that is cut with its layer
    report("analyse")
    analysis = analyse(model)
    report(f"score and plan ({opts.criterion}, {opts.allocator})")
    p = plan(analysis, calib=calib, progress=progress, **opts.plan_options())
    repaired: dict[str, Any] = {}
    work = zero_removed(model, p) if steps else model
    for name, options in steps:
        report(f"{name}: layer", 0, None)
        result = repairs.get(name)(**options).apply(model, p, work, calib, progress=counted(progress, f"{name}: layer"))
        work = result.model
        repaired["fused_channels" if name == "exact" else name] = (
            result.stats["fused_channels"] if name == "exact" else len(result.details)
        )
    check_finite(work, had=had_nonfinite, what="the repaired model")
    reference = zero_removed(work, p) if opts.verify else None
    report("surgery")
    pruned = prune(work, p, command=command, inplace=True)
    summary = json.loads(pruned.metadata()["carve.prune"])
    if repaired:
        summary["repairs"] = repaired
    if calib is not None:
        summary["calibration"] = calib.describe()
    if reference is not None:
        report("verify in ONNX Runtime")
        summary["verify"] = verify_equal(reference, pruned)
    notes = nothing_removed(summary, opts)
    if notes:
        summary["warnings"] = notes
        for n in notes:
            warn(n)
    record(pruned, "prune", summary, command=command, replace_last=True)
    return pruned, summary


def describe_amount(summary: dict) -> str:
    """How much was asked for, in words: ``l1, uniform ratio 0.5`` or ``l1, uniform to MACs 0.745 for target 0.75``
    (with a target, the allocator's bisected ratio is not what was removed: chunks are given back afterwards, so it
    is not shown)."""
    o = summary["options"]
    head = f"{summary['criterion']}, {summary['allocator']}"
    for kind, label in (("macs", "MACs"), ("params", "params")):
        if o.get(f"target_{kind}") is not None:
            return f"{head} to {label} {o[f'achieved_{kind}']:.3g} for target {o[f'target_{kind}']:g}"
    return f"{head} ratio {o['ratio']:.3g}"


def nothing_removed(summary: dict, opts: PruneOptions) -> list[str]:
    """A sentence when the plan removed nothing although something was asked for (``--round-to 1000`` or
    ``--keep-min 1000`` keep every layer whole; everything may be frozen)."""
    asked = opts.ratio > 0 or opts.target_macs is not None or opts.target_params is not None
    if summary.get("channels_removed", 0) or not asked:
        return []
    why = []
    if opts.round_to > 1:
        why.append(f"--round-to {opts.round_to}")
    if opts.keep_min > 1:
        why.append(f"--keep-min {opts.keep_min}")
    because = f"{' and '.join(why)} keep every layer at its width" if why else "no channel could be removed"
    return [f"nothing was removed: {because}; the model is unchanged (`carve inspect` shows the layer widths)"]


def options_dict(opts: PruneOptions) -> dict:
    return asdict(opts)
