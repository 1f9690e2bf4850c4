"""The whole pruning operation, shared by ``carve prune``, the ``prune`` pass of recipes and the Python API:

    analyse -> plan (criterion + allocator, to a Target: a ratio or a MAC/param/latency target) -> [measure and
    refine: latency target] -> repairs (an ordered list from the registry) -> surgery -> verification -> [measured
    against the original] -> one history entry

Criteria, allocators and repairs are reached through their registries. Repairs work on a *working* copy of the model
whose removed consumer columns are zeroed, so verification is always the same statement: the pruned model equals the
(repaired) working model in ONNX Runtime. Latency tables and measurements come from a :class:`LatencyOracle` the
caller passes (``carve.pipeline.measure.oracle.MeasuredLatency``: the CLI, recipes and
:func:`carve.pipeline.flows.prune.prune_measured` do); without one, nothing is measured and a latency target is refused.
Without ``round_to`` kept widths are multiples of what the backend's kernels want
(:func:`carve.pipeline.pruning.closed_loop.default_alignment`). The result is a :class:`PruneReport`; the model's
``carve.prune`` history entry is written once, here, from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from carve.pipeline.config import bounds, from_mapping, validate
from carve.pipeline.errors import CarveError, UnreachableTarget, warn
from carve.pipeline.graph.channels import ChannelAnalysis, analyse
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.history import record
from carve.pipeline.graph.model import Model, check_finite, nonfinite_initializers
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.precision import refuse_quantized
from carve.pipeline.graph.rewrite import ensure_biases
from carve.pipeline.graph.surgery import cut, reference, zero_removed
from carve.pipeline.progress import Progress, silent
from carve.pipeline.pruning.allocator import Costs
from carve.pipeline.pruning.closed_loop import LatencyOracle, Loop, Measured, closed_loop, default_alignment, tolerance
from carve.pipeline.pruning.criterion import criteria
from carve.pipeline.pruning.planner import Scores, Widths, allocator_for, plan, score
from carve.pipeline.pruning.repair import RepairStep, parse_repairs, repairs
from carve.pipeline.pruning.report import Inexact, LatencyReport, PruneReport, Verified
from carve.pipeline.pruning.targets import Target
from carve.pipeline.runtime.verify import compare_outputs, verify_equal


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
    # the units of an attention: whole heads, or per-head widths of Q/K and of V/out (same count in every head)
    attention: str = field(default="heads", metadata=bounds(choices=("heads", "width")))
    # the units of a grouped conv: whole groups (``group`` shrinks) or one position of every group (equal widths)
    conv_groups: str = field(default="whole", metadata=bounds(choices=("whole", "width")))
    seed: int = 0
    criterion_options: dict[str, Any] = field(default_factory=dict)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    # post-training repairs, in order: registry names or {name: {options}} (``[lsq, bn]``, ``[{lsq: {ridge: 0.01}}]``)
    repairs: list[Any] = field(default_factory=list)
    verify: bool = True
    # the engine a latency target, the table and the measurements refer to
    backend: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    precision: str = "fp32"
    measure: bool = True  # measure the pruned model against the original (quick interleaved A/B)
    refine: int = field(default=2, metadata=bounds(ge=0))  # closed-loop refinement steps for a latency target

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None, *, where: str) -> PruneOptions:
        """Options from a recipe mapping (a pass's options, a sweep's ``prune:`` section); the keys of earlier
        versions (``fuse``, ``repair``, ``ridge``, ``fuse_gate``) are read as ``repairs`` with a warning."""
        return from_mapping(cls, legacy_repairs(dict(mapping or {}), where=where), where=where)

    def target(self) -> Target:
        """The one target these options give (validated)."""
        return Target.from_options(
            ratio=self.ratio,
            target_macs=self.target_macs,
            target_params=self.target_params,
            target_latency=self.target_latency,
        )

    def alignment(self) -> int:
        """``round_to``, or the backend's channel multiple when not given."""
        return self.round_to if self.round_to is not None else default_alignment(self.backend, self.device)

    def widths(self, round_to: int | None = None) -> Widths:
        return Widths(round_to or self.alignment(), self.keep_min, tuple(self.exclude))

    def repair_steps(self) -> list[RepairStep]:
        """The repairs to run, in order (checked against the registry)."""
        return parse_repairs(self.repairs, where="`repairs`")

    def data_needed(self) -> str | None:
        """Who needs calibration data under these options (for messages), or None when nothing does."""
        needs = sorted(criteria.get(self.criterion).needs & {"activations", "labels", "gradients"})
        if needs:
            return f"criterion {self.criterion!r} ({', '.join(needs)})"
        for step in self.repair_steps():
            if "calib" in repairs.get(step.name).needs:
                return f"repair {step.name!r}"
        return None

    def check(self, calib: Any) -> Target:
        """Validate everything that can be checked before any work; returns the target."""
        validate(self)
        target = self.target()
        allocator_for(self.allocator, target, self.allocator_options)
        who = self.data_needed()
        if who and calib is None:
            raise CarveError(f"{who} needs calibration data", hint="give `calib` FILE.npz | FOLDER | digits")
        return target


LEGACY_REPAIR_KEYS = ("fuse", "repair", "ridge", "fuse_gate")


def legacy_repairs(mapping: dict[str, Any], *, where: str) -> dict[str, Any]:
    """A mapping whose repair keys of earlier versions (``fuse: exact|lsq``, ``repair: bias|bn``, ``ridge``,
    ``fuse_gate``) are rewritten as ``repairs`` (the fusion first, as they ran), saying so."""
    old = {k: mapping.pop(k) for k in LEGACY_REPAIR_KEYS if k in mapping}
    if not old:
        return mapping
    if "repairs" in mapping:
        raise CarveError(f"{where}: give `repairs` only (`{sorted(old)[0]}` is its older spelling)")
    steps: list[Any] = []
    for key in ("fuse", "repair"):
        if old.get(key) not in (None, "none"):
            name = str(old[key])
            opts = {"lsq": {"ridge": old.get("ridge")}, "exact": {"gate": old.get("fuse_gate")}}.get(name, {})
            opts = {k: v for k, v in opts.items() if v is not None}
            steps.append({name: opts} if opts else name)
    mapping["repairs"] = steps
    said = ", ".join(f"{k}: {v}" for k, v in old.items())
    warn(f"{where}: `{said}` is written `repairs: {yaml.safe_dump(steps, default_flow_style=True).strip()}` now")
    return mapping


def prune_model(
    model: Model,
    opts: PruneOptions,
    *,
    calib: Any = None,
    command: str | None = None,
    inplace: bool = False,
    progress: Progress | None = None,
    latency: LatencyOracle | None = None,
) -> PruneReport:
    """Prune ``model`` as ``opts`` says; returns a :class:`PruneReport` (the pruned model is ``report.model``; its
    history holds ``report.to_json()``). ``progress`` (:mod:`carve.pipeline.progress`) hears every stage: analyse,
    score, plan, each repair layer by layer, surgery, verify. ``latency`` measures
    (:class:`~carve.pipeline.pruning.closed_loop.LatencyOracle`): it gives the latency table for a latency target,
    checks the plan on the engine (closed loop), and measures the result against the original."""
    refuse_quantized(model, "prune")
    target = opts.check(calib)
    steps = opts.repair_steps()
    if target.kind == "latency" and latency is None:
        raise CarveError(
            "a latency target needs measurements on the target engine",
            hint="use carve.pipeline.flows.prune.prune_measured(...) or pass latency=MeasuredLatency(...)",
        )
    if (target.kind == "latency" or opts.lut) and opts.conv_groups != "whole":
        raise CarveError(
            "a latency table profiles grouped convs by whole groups; `conv_groups=width` cannot use one (a latency "
            "target or `lut`)",
            hint="use `conv_groups=whole` (the default), or a MAC or parameter target with equal widths",
        )
    report = progress or silent
    had_nonfinite = nonfinite_initializers(model)  # the input's own (e.g. a Clip bound of inf) are not ours
    if not inplace:
        model = model.copy()
    built = [(step.name, step.build()) for step in steps]
    given = model_cost(model)  # the model as given: zero biases added below are not the user's parameters
    if any("biases" in r.needs for _, r in built):
        ensure_biases(model)  # e.g. a refit's intercept needs a bias that is cut with its layer
    report("analyse")
    analysis = analyse(model, attention=opts.attention, conv_groups=opts.conv_groups)
    folded_warning(model, opts.criterion)
    report(f"score and plan ({opts.criterion}, {opts.allocator or 'default allocator'})")
    scores = score(
        analysis, opts.criterion, options=opts.criterion_options, calib=calib, seed=opts.seed, progress=progress
    )
    table = bound = None
    if target.kind == "latency" or opts.lut:
        table = latency.table(model)
        bound = table.bind(analysis)
    asked = Target("latency", min(1.0, target.budget(table.model_ms))) if target.kind == "latency" else target
    p = plan_aligned(analysis, opts, asked, scores, bound)
    loop = None
    measuring = latency is not None and opts.measure
    original = model.copy() if measuring else None  # the unpruned model (surgery below works in place)
    if target.kind == "latency" and measuring:
        widths = opts.widths(p.options["round_to"])

        def replan(budget: float) -> Plan:
            again = Target("latency", budget)
            allocator = allocator_for(opts.allocator, again, opts.allocator_options)
            return plan(analysis, again, scores=scores, allocator=allocator, widths=widths, latency=bound)

        p, loop = closed_loop(
            original, analysis, p, replan, target, latency, error=tolerance(table.stated_error), refine=opts.refine
        )
    work, repaired = run_repairs(model, analysis, p, built, calib, progress)
    check_finite(work, had=had_nonfinite, what="the repaired model")
    check_ref = reference(work, p) if opts.verify else None
    inexact = analysis.inexact_units(p.removed)
    plain_ref = reference(work, p, statistics="all") if opts.verify and len(inexact) else None
    report("surgery")
    done = cut(work, p, inplace=True)
    out = PruneReport.of(done, p, target, repairs=repaired, calibration=calib.describe() if calib is not None else None)
    out.before = given  # one parameter count of the original everywhere (bench, inspect, report count the file)
    if check_ref is not None:
        report("verify in ONNX Runtime")
        v = verify_equal(check_ref, done.model)
        out.verify = Verified(v["max_abs_diff"], v["scale"], "masked statistics" if plain_ref is not None else "zeroed")
    if len(inexact):
        out.inexact = inexact_report(analysis, inexact, plain_ref, done.model)
    out.warnings = nothing_removed(out, opts)
    for n in out.warnings:
        warn(n)
    if measuring:
        measured = loop.kept.measurement if loop else Measured.of(latency.measure(original, done.model))
        out.latency = latency_report(latency, measured, p, table, loop)
    elif bound is not None:
        out.latency = latency_report(latency, None, p, table, loop)
    record(done.model, "prune", out.recorded(), command=command)
    return out


FOLDED_MIN_CONVS = 8  # deep CNNs without BN in the graph are, nearly always, exports that folded it


def folded_warning(model: Model, criterion: str) -> None:
    """A criterion that ranks filters by their stored size, on a deep CNN without a BatchNormalization in the graph
    (an eval-mode export folds BN into the convs, so each filter carries BN's gamma / sigma): say that it ranks other
    channels than on the BN-kept export, and what does not (issue 26, docs/finetune.md). Shallow nets (LeNet) often
    never had BN, so fewer than :data:`FOLDED_MIN_CONVS` convs say nothing."""
    if not getattr(criteria.get(criterion), "reads_filter_scale", False):
        return
    ops = [n.op_type for n in model.graph.node]
    if ops.count("Conv") >= FOLDED_MIN_CONVS and "BatchNormalization" not in ops:
        warn(
            f"criterion {criterion!r} ranks filters by their size, and this graph has no BatchNormalization: if an "
            "eval-mode export folded it into the convs, each filter carries BN's gamma / sigma and the ranking is not "
            "the BN-kept export's; criterion 'energy' (calibration data) ranks both alike "
            "(docs/finetune.md#pruning-folded-exports-the-energy-criterion)"
        )


def run_repairs(
    model: Model,
    analysis: ChannelAnalysis,
    p: Plan,
    built: list[tuple[str, Any]],
    calib: Any,
    progress: Progress | None,
) -> tuple[Model, dict[str, int]]:
    """Run the repairs in order on the working model (``model`` with the plan's removed columns zeroed); the repaired
    working model and what each repair did (its own counts, else its number of decisions).

    An inexact removal (LayerNorm statistics) or a removed contracted pair (a head's Q/K) changes what later layers
    see beyond the zeroed columns: then the repairs run on the model that computes what the pruned one will (the
    masked reference, weights shared by name) against the original in the same structure, and their weights are
    copied back into the working model."""
    repaired: dict[str, int] = {}
    work = zero_removed(model, p) if built else model
    masked = bool(built) and needs_mask(analysis, p.removed)
    source = reference(model, p, neutral=True) if masked else model  # the same nodes, the original's function
    for name, repair in built:
        (progress or silent)(f"{name}: layer", 0, None)
        target = reference(work, p) if masked else work
        result = repair.apply(source, p, target, calib, progress=progress)
        work = copy_weights(result.model, work) if masked else result.model
        repaired.update(result.counts if result.counts is not None else {name: len(result.details)})
    return work, repaired


def needs_mask(analysis: ChannelAnalysis, removed) -> bool:
    """Does the removal change more than the zeroed consumer columns say: statistics over removed channels
    (LayerNorm) or channels contracted between two activations (a head's Q/K)?"""
    if len(analysis.inexact_units(removed)):
        return True
    return any(removed[analysis.unit_of[r.ids]].any() for r in analysis.contract_records)


def copy_weights(source: Model, target: Model) -> Model:
    """``target`` with every initializer it shares by name with ``source`` taken from ``source``."""
    out = target.copy()
    for name in out.init:
        if name in source.init:
            out.set_array(name, source.array(name))
    return out


def inexact_report(analysis: ChannelAnalysis, units, plain_ref: Model | None, pruned: Model) -> Inexact:
    """What an inexact removal did (:class:`~carve.pipeline.pruning.report.Inexact`)."""
    groups = {int(analysis.unit_group[u]) for u in units}
    reasons = list(dict.fromkeys(r for u in units for r in analysis.inexact_reasons(u)))
    error = compare_outputs(plain_ref, pruned) if plain_ref is not None else None
    return Inexact(int(len(units)), len(groups), reasons[0] if reasons else "", error)


def plan_aligned(analysis: ChannelAnalysis, opts: PruneOptions, target: Target, scores: Scores, latency: Costs | None):
    """:func:`plan` at the backend's alignment; when the user did not choose ``round_to`` and that alignment makes
    a MAC or parameter target unreachable (narrow layers: a 16-wide layer cannot lose channels in steps of 16), halve
    the alignment until it is reachable, and say so. A ``round_to`` the user gave is kept as given."""
    first = align = opts.alignment()
    while True:
        try:
            allocator = allocator_for(opts.allocator, target, opts.allocator_options)
            p = plan(analysis, target, scores=scores, allocator=allocator, widths=opts.widths(align), latency=latency)
        except UnreachableTarget:
            if opts.round_to is not None or align <= 1 or target.kind == "latency":
                raise
            align //= 2
            continue
        if align != first:
            warn(
                f"the backend's channel alignment ({first}) cannot reach this target on this model's narrow layers; "
                f"planned with `round_to` {align} (give `round_to` to choose)"
            )
        return p


def nothing_removed(report: PruneReport, opts: PruneOptions) -> list[str]:
    """A sentence when the plan removed nothing although something was asked for (a ``round_to`` or ``keep_min`` of
    1000 keeps every layer whole; everything may be frozen)."""
    asked = report.target.kind != "ratio" or report.target.value > 0
    if report.channels_removed or not asked:
        return []
    why = []
    if opts.alignment() > 1:
        why.append(f"`round_to` {opts.alignment()}")
    if opts.keep_min > 1:
        why.append(f"`keep_min` {opts.keep_min}")
    because = f"{' and '.join(why)} keep every layer at its width" if why else "no channel could be removed"
    return [f"nothing was removed: {because}; the model is unchanged (`carve inspect` shows the layer widths)"]


def latency_report(
    latency: LatencyOracle | None, measured: Measured | None, p: Plan, table, loop: Loop | None
) -> LatencyReport:
    """What a prune reports about speed: the engine, the table's prediction, the measurement, the closed loop."""
    engine = latency.describe() if latency is not None else None
    if table is None:
        return LatencyReport(engine, measured=measured, loop=loop)
    return LatencyReport(
        engine,
        reference_ms=round(table.model_ms, 4),
        table_error=round(table.stated_error, 4),
        predicted=p.options.get("predicted_latency"),
        measured=measured,
        loop=loop,
    )
