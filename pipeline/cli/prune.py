"""``carve prune MODEL -o OUT``: physically remove the least important channels, repair, verify, and save."""

from __future__ import annotations

import argparse
import json

from carve.pipeline.cli._common import (
    KeyValues,
    add_calib_args,
    add_input_shape_arg,
    fraction,
    fraction_keep,
    non_negative_float,
    positive_int,
)


def latency_target(text: str) -> str:
    """``0.5``, ``50%``, ``4ms``, ``800us``: checked here, interpreted by carve.pipeline.pruning.targets.Target."""
    from carve.pipeline.errors import CarveError
    from carve.pipeline.pruning.targets import Target

    try:
        Target.parse("latency", text)
    except CarveError as exc:
        raise argparse.ArgumentTypeError(exc.message.split(": ", 1)[-1].replace("`", "")) from None
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels (physically smaller model)", description=__doc__)
    p.add_argument("model", help="ONNX file to prune (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned ONNX file")
    how = p.add_argument_group("how much")
    amount = how.add_mutually_exclusive_group()  # one way to say how much: a ratio or a target, never both
    amount.add_argument(
        "--ratio", type=fraction, default=0.5, help="fraction of each group's channels to remove (0.5, 30%%)"
    )
    amount.add_argument(
        "--target-macs",
        type=fraction_keep,
        metavar="F",
        help="instead of --ratio: keep this fraction of the MACs (the ratio is found by bisection)",
    )
    amount.add_argument(
        "--target-params",
        type=fraction_keep,
        metavar="F",
        help="instead of --ratio: keep this fraction of the parameters",
    )
    how.add_argument(
        "--target-latency",
        metavar="T",
        type=latency_target,
        help="instead of --ratio: a latency budget on --backend, a fraction of the original's (0.5) or a time "
        "(4ms); widths from a latency table (--lut, or profiled now and cached), checked by measurement",
    )
    how.add_argument("--lut", metavar="FILE", help="the latency table to plan with (`carve profile ... -o FILE`)")
    how.add_argument(
        "--round-to",
        type=positive_int,
        default=None,
        metavar="N",
        help="keep channel counts multiples of N (default: what --backend's kernels want, 16 on AVX-512 CPUs "
        "with ONNX Runtime, 8 on GPUs; 1 turns alignment off)",
    )
    how.add_argument("--keep-min", type=positive_int, default=1, metavar="N", help="keep at least N channels per layer")
    how.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NODE_PATTERN",
        help="never prune channels that these nodes produce or read (glob on node names; repeatable)",
    )
    which = p.add_argument_group("which channels")
    which.add_argument(
        "--criterion",
        default="l1",
        help="importance criterion (`carve plugins` lists them); default l1. On an eval-mode export (BN folded into "
        "the convs) use energy with --calib: it ranks channels as on the BN-kept export",
    )
    which.add_argument(
        "--criterion-opt",
        dest="criterion_options",
        action=KeyValues,
        default={},
        metavar="KEY=VALUE",
        help="an option of the criterion, e.g. temperature=0.5 (repeatable)",
    )
    which.add_argument(
        "--allocate",
        dest="allocator",
        default=None,
        help="how to spread the removal over layers: uniform (default), global, dispersion, latency (the default "
        "with --target-latency: a knapsack over measured widths), knapsack (the same knapsack under any target: "
        "--target-macs/--target-params with their exact cost)",
    )
    which.add_argument(
        "--allocator-opt",
        dest="allocator_options",
        action=KeyValues,
        default={},
        metavar="KEY=VALUE",
        help="an option of the allocator, e.g. beta=2 (repeatable)",
    )
    which.add_argument(
        "--attention",
        choices=["heads", "width"],
        default="heads",
        help="the units of an attention: whole heads (default), or per-head widths of Q/K and of V/out, the same "
        "in every head",
    )
    which.add_argument(
        "--conv-groups",
        choices=["whole", "width"],
        default="whole",
        help="the units of a grouped (not depthwise) conv: whole groups (default; its group count shrinks), or equal "
        "widths in every group",
    )
    which.add_argument("--seed", type=int, default=0, help="seed for random criteria and sampling")
    add_calib_args(p)
    rep = p.add_argument_group("repair (no training; `carve plugins` lists the repairs and their options)")
    rep.add_argument(
        "--repair",
        dest="repair_names",
        action="append",
        default=[],
        metavar="NAME",
        help="a post-training repair, run in the order given (repeatable): exact (fold removed filters that are "
        "positive multiples of kept ones into the consumers), lsq (refit the consumers by least squares on --calib "
        "data), bias (correct consumer biases for the mean shift), bn (re-estimate BatchNorm statistics), or one a "
        "package registers (entry-point group carve.repairs)",
    )
    rep.add_argument(
        "--repair-opt",
        dest="repair_options",
        action=KeyValues,
        default={},
        metavar="[NAME.]KEY=VALUE",
        help="an option of a chosen repair, e.g. ridge=1e-2 (the repair that takes it) or lsq.ridge=1e-2 (repeatable)",
    )
    rep.add_argument("--fuse", choices=["exact", "lsq"], help="older spelling of --repair exact|lsq (run first)")
    rep.add_argument("--ridge", type=non_negative_float, help="older spelling of --repair-opt lsq.ridge=X")
    rep.add_argument("--fuse-gate", type=non_negative_float, help="older spelling of --repair-opt exact.gate=X")
    eng = p.add_argument_group(
        "speed (the engine the latency target and the measurements refer to; with --lut, the table's by default)"
    )
    eng.add_argument("--backend", help="ort | trt | torch-cuda | torch-cpu (default ort)")
    eng.add_argument("--device", help="ort: cpu | cuda | tensorrt execution provider (default cpu)")
    eng.add_argument("--threads", type=positive_int, help="CPU threads (default 1)")
    eng.add_argument("--batch", type=positive_int, help="batch size (default 1)")
    eng.add_argument("--precision", choices=["fp32", "fp16"], help="engine precision (default fp32)")
    eng.add_argument(
        "--no-measure",
        dest="measure",
        action="store_false",
        help="skip the quick interleaved A/B of the pruned model against the original (and the closed loop)",
    )
    eng.add_argument(
        "--refine",
        type=int,
        default=2,
        metavar="N",
        help="with --target-latency: at most N corrections when the measured latency misses the target (default 2)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the ONNX Runtime check that the result equals its (repaired) reference",
    )
    add_input_shape_arg(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run, option_flags={"repairs": "--repair", "allocator_options": "--allocator-opt"})


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import command_line, console, load_calib
    from carve.pipeline.cli._progress import show_progress
    from carve.pipeline.config import from_args
    from carve.pipeline.data.shared import data_input
    from carve.pipeline.flows.prune import prune_file
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.pruning.prune import PruneOptions

    check_output_path(args.output, args.model, data_input(args.calib), args.lut)
    engine_defaults(args)
    args.repairs = repair_list(args)
    opts = from_args(PruneOptions, args)
    model = load(args.model, input_shape=args.input_shape)
    calib = load_calib(args, model, required=opts.data_needed() or False)
    con = console(args.quiet or args.json)
    with show_progress("carve prune", con, quiet=args.quiet or args.json) as progress:
        report = prune_file(model, args.output, opts, calib=calib, command=command_line(), progress=progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return 0 if not slower_than_asked(report) else 1
    align = "widths from the latency table" if report.widths_from_table else f"round-to {report.round_to}"
    con.print(
        f"removed {report.channels_removed}/{report.channels_before} output channels "
        f"({report.describe_amount()}, {align})"
    )
    b, a = report.before, report.after
    con.print(
        f"params {b.params:,} -> {a.params:,} ({report.params_ratio:.1%}); "
        f"MACs {b.macs:,} -> {a.macs:,} ({report.macs_ratio:.1%}, a MAC ratio, not a speed-up)"
    )
    for line in latency_lines(report):
        con.print(line)
    if report.repairs:
        con.print("repairs: " + ", ".join(f"{k} {v}" for k, v in report.repairs.items()))
    if report.verify is not None:
        v = report.verify
        ref = "its repaired reference" if report.repairs else "the original with the removed channels zeroed"
        if v.reference == "masked statistics":
            ref += " and LayerNorm statistics taken over the kept channels"
        con.print(
            f"verified in ONNX Runtime: output equals {ref} (max |diff| {v.max_abs_diff:.2e}, scale {v.scale:.2e})"
        )
    if report.inexact is not None:
        con.print(inexact_line(report.inexact))
    con.print(f"wrote {args.output}")
    if slower_than_asked(report):
        con.print("[red]error: a speed-up was asked (--target-latency) and the pruned model is slower[/red]")
        return 1
    return 0


def inexact_line(ix) -> str:
    """The sentence that says a removal was not exact (:class:`~carve.pipeline.pruning.report.Inexact`), and by how
    much."""
    head = (
        f"inexact: {ix.units} removed units in {ix.groups} LayerNorm-normalised group(s) change the norm's statistics"
    )
    err = ix.error
    if not err:
        return head + " (not measured: --no-verify)"
    return (
        f"{head}; against the original with them zeroed but statistics over every channel the output differs by "
        f"{err['max_rel']:.2%} of its scale (cosine {err['cosine']:.4f}): repair or fine-tune to recover it"
    )


def repair_list(args: argparse.Namespace) -> list:
    """The repairs to run, in order, from ``--repair`` and ``--repair-opt`` (and the older ``--fuse``, ``--ridge``,
    ``--fuse-gate``, each said in the new spelling on stderr)."""
    from carve.pipeline.errors import warn
    from carve.pipeline.pruning.repair import parse_repairs, with_options

    names = ([args.fuse] if args.fuse else []) + list(args.repair_names)
    options = dict(args.repair_options)
    for old, key, value in (("--ridge", "lsq.ridge", args.ridge), ("--fuse-gate", "exact.gate", args.fuse_gate)):
        if value is not None:
            options.setdefault(key, value)
            warn(f"{old} {value:g} is --repair-opt {key}={value:g}")
    if args.fuse:
        warn(f"--fuse {args.fuse} is --repair {args.fuse} (run before the other repairs)")
    steps = with_options(parse_repairs(names, where="--repair"), options, where="--repair-opt")
    return [s.to_json() for s in steps]


ENGINE = {"backend": "ort", "device": "cpu", "threads": 1, "batch": 1, "precision": "fp32"}


def engine_defaults(args: argparse.Namespace) -> None:
    """Engine settings not given on the command line: the latency table's (--lut), else ONNX Runtime CPU, 1 thread,
    batch 1, fp32."""
    key = {}
    if args.lut:
        from carve.pipeline.measure.latency_table import LatencyTable

        key = LatencyTable.load(args.lut).key
    for name, default in ENGINE.items():
        if getattr(args, name) is None:
            setattr(args, name, key.get(name, default))


def latency_lines(report) -> list[str]:
    """The prune report's speed lines: predicted, measured beside the original, the closed loop's steps."""
    from carve.pipeline.measure.report import ab_text

    lat = report.latency
    if lat is None:
        return []
    lines = []
    if lat.predicted is not None:
        lines.append(
            f"latency on {lat.engine}: predicted {lat.predicted:.3f} of the original "
            f"({lat.predicted * lat.reference_ms:.3f} ms; the table's stated error {lat.table_error:.0%})"
        )
    m = lat.measured
    if m is not None:
        s, (lo, hi) = m.speedup, m.ci
        word = ab_verdict(m.a_ms, m.b_ms, lo, hi)
        figures = ab_text(m.a_ms, m.b_ms, s, (lo, hi), m.clock, a="original", b="pruned")
        text = (
            f"measured on {lat.engine}, interleaved: {figures}: {word}; latency ratio {m.ratio:.3f} (median of "
            f"paired ratios) beside a MAC ratio of {report.macs_ratio:.3f}"
        )
        if report.channels_removed == 0:
            text += " (nothing was removed: the original meets the target)"
        elif word == "slower":
            text = f"[red]{text}: THE PRUNED MODEL IS SLOWER THAN THE ORIGINAL[/red]"
        elif word != "faster":
            text = f"[yellow]{text}[/yellow]"
        lines.append(text)
    loop = lat.loop
    if loop is not None:
        unit = " ms" if loop.target.absolute else ""
        for k, st in enumerate(loop.steps):
            mark = " (kept)" if k == loop.chosen else ""
            stop = f"; stopped: {st.stopped}" if st.stopped is not None else ""
            lines.append(
                f"  step {k + 1}: table budget {st.budget:.3f}, predicted {st.predicted:.3f}, measured "
                f"{st.measured:.3f}{unit} ({st.miss:+.1%} from the target){mark}{stop}"
            )
        if not loop.met:
            lines.append(
                f"[yellow]warning: the target {loop.target.describe()} was missed by more than the table's error "
                f"({loop.error:.0%}) after {len(loop.steps)} measurement(s)[/yellow]"
            )
    return lines


def ab_verdict(a_ms: float, b_ms: float, lo: float, hi: float) -> str:
    """The word for a quick A/B that agrees with every number printed beside it (issue 21): "faster" or "slower" only
    when the interval of per-round speed-ups excludes 1 *and* the medians point the same way; "no measurable change"
    when the interval holds 1; the medians and the rounds disagreeing is said as such."""
    if lo <= 1.0 <= hi:
        return "no measurable change"
    if lo > 1.0:
        return "faster" if b_ms < a_ms else "no measurable change (the medians and the per-round ratios disagree)"
    return "slower" if b_ms > a_ms else "no measurable change (the medians and the per-round ratios disagree)"


def slower_than_asked(report) -> bool:
    """A speed-up was asked for, channels were removed, and the measurement says with confidence that the result is
    slower than the original."""
    m = report.latency.measured if report.latency is not None else None
    asked = report.target.kind == "latency"
    return asked and report.channels_removed > 0 and m is not None and m.ci[1] < 1.0
