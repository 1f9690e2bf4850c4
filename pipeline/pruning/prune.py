"""The whole pruning operation, shared by ``carve prune``, the ``prune`` pass of recipes and the Python API:

    analyse -> plan (criterion + allocator, ratio or MAC/param/latency target) -> [measure and refine: latency
    target] -> repairs ([exact fusion] [lsq refit] [bias correction | BN re-estimation]) -> surgery -> verification
    -> [measured against the original]

Criteria, allocators and repairs are reached through their registries. Repairs work on a *working* copy of the model
whose removed consumer columns are zeroed, so verification is always the same statement: the pruned model equals the
(repaired) working model in ONNX Runtime. Latency tables and measurements come from a :class:`LatencyOracle` the
caller passes (``carve.pipeline.measure.latency.MeasuredLatency``: the CLI, recipes and
:func:`carve.pipeline.flows.prune.prune_measured` do); without one, nothing is measured and a latency target is refused.
Without ``round_to`` kept widths are multiples of what the backend's kernels want
(:func:`carve.pipeline.pruning.latency.default_alignment`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from carve.pipeline.config import bounds, options_for, validate
from carve.pipeline.errors import CarveError, UnreachableTarget, warn
from carve.pipeline.graph.channels import analyse
from carve.pipeline.graph.history import record
from carve.pipeline.graph.model import Model, check_finite, nonfinite_initializers
from carve.pipeline.graph.rewrite import ensure_biases
from carve.pipeline.graph.surgery import prune, zero_removed
from carve.pipeline.progress import Progress, silent
from carve.pipeline.pruning.criterion import criteria
from carve.pipeline.pruning.latency import LatencyOracle, closed_loop, default_alignment, parse_target, tolerance
from carve.pipeline.pruning.planner import plan
from carve.pipeline.pruning.repair import repairs
from carve.pipeline.runtime.verify import verify_equal


@dataclass
class PruneOptions:
    criterion: str = "l1"
    ratio: float = field(default=0.5, metadata=bounds(ge=0, lt=1))
    target_macs: float | None = field(default=None, metadata=bounds(gt=0, le=1))
    target_params: float | None = field(default=None, metadata=bounds(gt=0, le=1))
    target_latency: float | str | None = None  # 0.5 (of the original's latency) or "4ms"
    lut: str | None = None  # a latency table file (`carve profile`); else profiled on the backend (cached)
    allocator: str | None = None  # default: latency with a latency target, else uniform
    round_to: int | None = field(default=None, metadata=bounds(ge=1))  # default: the backend's channel multiple
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
    # the engine a latency target, the table and the measurements refer to
    backend: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    precision: str = "fp32"
    measure: bool = True  # measure the pruned model against the original (quick interleaved A/B)
    refine: int = 2  # closed-loop refinement steps for a latency target

    def plan_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`carve.pipeline.pruning.planner.plan` these options set (the latency target is
        set by :func:`prune_model`, as a fraction of the table's reference)."""
        out = {**options_for(plan, asdict(self)), **self.allocator_options}
        out.pop("target_latency", None)
        out["round_to"] = self.alignment()
        return out

    def alignment(self) -> int:
        """``round_to``, or the backend's channel multiple when not given."""
        return self.round_to if self.round_to is not None else default_alignment(self.backend, self.device)

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
        given = [t for t in (self.target_macs, self.target_params, self.target_latency) if t is not None]
        if len(given) > 1:
            raise CarveError("give one of --target-macs, --target-params and --target-latency")
        if self.target_latency is not None:
            parse_target(self.target_latency)
        if self.allocator == "latency" and self.target_latency is None:
            raise CarveError("allocator 'latency' needs --target-latency", hint="or --allocate knapsack --target-macs")
        if self.allocator == "knapsack" and not given:
            raise CarveError(
                "allocator 'knapsack' needs a target: --target-latency, --target-macs or --target-params",
                hint="a knapsack spends a budget; --ratio is for the uniform, global and dispersion allocators",
            )
        if self.refine < 0:
            raise CarveError(f"--refine must be 0 or more, got {self.refine}")
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
    latency: LatencyOracle | None = None,
) -> tuple[Model, dict]:
    """Prune ``model`` as ``opts`` says; returns the pruned model and a summary (also stored in its metadata).
    ``progress`` (:mod:`carve.pipeline.progress`) hears every stage: analyse, score, plan, each repair layer by layer,
    surgery, verify. ``latency`` measures (:class:`~carve.pipeline.pruning.latency.LatencyOracle`): it gives the latency
    table for a latency target, checks the plan on the engine (closed loop), and measures the result against the
    original."""
    opts.check(calib)
    if opts.target_latency is not None and latency is None:
        raise CarveError(
            "a latency target needs measurements on the target engine",
            hint="use carve.pipeline.flows.prune.prune_measured(...) or pass latency=MeasuredLatency(...)",
        )
    report = progress or silent
    had_nonfinite = nonfinite_initializers(model)  # the input's own (e.g. a Clip bound of inf) are not ours
    if not inplace:
        model = model.copy()
    steps = opts.repair_steps()
    if any(name in ("lsq", "bias") for name, _ in steps):
        ensure_biases(model)  # the refit's intercept needs a bias that is cut with its layer
    report("analyse")
    analysis = analyse(model)
    report(f"score and plan ({opts.criterion}, {opts.allocator or 'default allocator'})")
    plan_opts = opts.plan_options()
    table = bound = target = None
    if opts.target_latency is not None or opts.lut:
        table = latency.table(model)
        bound = table.bind(analysis)
        plan_opts["latency"] = bound
    if opts.target_latency is not None:
        target = parse_target(opts.target_latency)
        plan_opts["target_latency"] = min(1.0, target.budget(table.model_ms))
    p = plan_aligned(analysis, opts, plan_opts, calib=calib, progress=progress)
    plan_opts["round_to"] = p.options.get("round_to", plan_opts.get("round_to"))
    loop = None
    measuring = latency is not None and opts.measure
    original = model.copy() if measuring else None  # the unpruned model (surgery below works in place)
    if target is not None and measuring:

        def replan(budget: float):
            return plan(analysis, calib=calib, **{**plan_opts, "target_latency": budget, "scores": p.scores})

        p, loop = closed_loop(
            original, analysis, p, replan, target, latency, error=tolerance(table.stated_error), refine=opts.refine
        )
    repaired: dict[str, Any] = {}
    work = zero_removed(model, p) if steps else model
    for name, options in steps:
        report(f"{name}: layer", 0, None)
        result = repairs.get(name)(**options).apply(model, p, work, calib, progress=progress)
        work = result.model
        repaired["fused_channels" if name == "exact" else name] = (
            result.stats["fused_channels"] if name == "exact" else len(result.details)
        )
    check_finite(work, had=had_nonfinite, what="the repaired model")
    check_ref = zero_removed(work, p) if opts.verify else None
    report("surgery")
    pruned = prune(work, p, command=command, inplace=True)
    summary = json.loads(pruned.metadata()["carve.prune"])
    if repaired:
        summary["repairs"] = repaired
    if calib is not None:
        summary["calibration"] = calib.describe()
    if check_ref is not None:
        report("verify in ONNX Runtime")
        summary["verify"] = verify_equal(check_ref, pruned)
    notes = nothing_removed(summary, opts)
    if notes:
        summary["warnings"] = notes
        for n in notes:
            warn(n)
    if measuring:
        measured = loop["steps"][loop["chosen"]] if loop else latency.measure(original, pruned)
        summary["latency"] = latency_summary(latency, measured, p, table, loop)
    elif bound is not None:
        summary["latency"] = latency_summary(latency, None, p, table, loop)
    record(pruned, "prune", recorded(summary), command=command, replace_last=True)
    return pruned, summary


def recorded(summary: dict) -> dict:
    """What the model's history keeps of a prune: all of the summary, except that under ``SOURCE_DATE_EPOCH`` (a
    reproducible build) the timings measured on this machine are left out: they describe the machine, not the model,
    and would make two identical prunes differ byte for byte. They stay in the returned summary either way."""
    if "latency" not in summary or not os.environ.get("SOURCE_DATE_EPOCH"):
        return summary
    latency = {k: v for k, v in summary["latency"].items() if k not in ("measured", "loop")}
    return {**summary, "latency": latency}


def plan_aligned(analysis, opts: PruneOptions, plan_opts: dict, *, calib: Any = None, progress=None):
    """:func:`plan` at the backend's alignment; when the user did not choose ``--round-to`` and that alignment makes
    a MAC or parameter target unreachable (narrow layers: a 16-wide layer cannot lose channels in steps of 16), halve
    the alignment until it is reachable, and say so. A ``--round-to`` the user gave is kept as given."""
    align = plan_opts.get("round_to") or 1
    while True:
        try:
            p = plan(analysis, calib=calib, progress=progress, **{**plan_opts, "round_to": align})
        except UnreachableTarget:
            if opts.round_to is not None or align <= 1 or "latency" in plan_opts:
                raise
            align //= 2
            continue
        if align != (plan_opts.get("round_to") or 1):
            warn(
                f"the backend's channel alignment ({plan_opts['round_to']}) cannot reach this target on this model's "
                f"narrow layers; planned with round-to {align} (give --round-to to choose)"
            )
        p.options["round_to"] = align
        return p


def describe_amount(summary: dict) -> str:
    """How much was asked for, in words: ``l1, uniform ratio 0.5`` or ``l1, uniform to MACs 0.745 for target 0.75``
    (with a target, the allocator's bisected ratio is not what was removed: chunks are given back afterwards, so it
    is not shown)."""
    o = summary["options"]
    head = f"{summary['criterion']}, {summary['allocator']}"
    for kind, label in (("macs", "MACs"), ("params", "params")):
        if o.get(f"target_{kind}") is not None:
            return f"{head} to {label} {o[f'achieved_{kind}']:.3g} for target {o[f'target_{kind}']:g}"
    if o.get("target_latency") is not None:
        predicted = o.get("predicted_latency")
        to = f" to predicted latency {predicted:.3g}" if predicted is not None else ""
        return f"{head}{to} for latency target {o['target_latency']:.3g}"
    return f"{head} ratio {o['ratio']:.3g}"


def nothing_removed(summary: dict, opts: PruneOptions) -> list[str]:
    """A sentence when the plan removed nothing although something was asked for (``--round-to 1000`` or
    ``--keep-min 1000`` keep every layer whole; everything may be frozen)."""
    asked = opts.ratio > 0 or any(t is not None for t in (opts.target_macs, opts.target_params, opts.target_latency))
    if summary.get("channels_removed", 0) or not asked:
        return []
    why = []
    if opts.alignment() > 1:
        why.append(f"--round-to {opts.alignment()}")
    if opts.keep_min > 1:
        why.append(f"--keep-min {opts.keep_min}")
    because = f"{' and '.join(why)} keep every layer at its width" if why else "no channel could be removed"
    return [f"nothing was removed: {because}; the model is unchanged (`carve inspect` shows the layer widths)"]


def latency_summary(latency: LatencyOracle | None, measured: dict | None, p, table, loop: dict | None) -> dict:
    """What a prune reports about speed: the engine, the table's prediction, the measurement, the closed loop."""
    out: dict[str, Any] = {"engine": latency.describe() if latency is not None else None}
    if table is not None:
        out["table"] = {"reference_ms": round(table.model_ms, 4), "error": round(table.stated_error, 4)}
        out["predicted"] = p.options.get("predicted_latency")
    if measured is not None:
        out["measured"] = {k: measured[k] for k in ("ratio", "speedup", "ci", "a_ms", "b_ms") if k in measured}
        if "clock" in measured:
            out["measured"]["clock"] = measured["clock"]
    if loop is not None:
        out["loop"] = loop
    return out


def options_dict(opts: PruneOptions) -> dict:
    return asdict(opts)
