"""``carve prune MODEL -o OUT``: physically remove the least important channels, repair, verify, and save."""

from __future__ import annotations

import argparse
import json

from pipeline.cli._common import (
    KeyValues,
    add_calib_args,
    add_input_shape_arg,
    fraction,
    fraction_keep,
    non_negative_float,
    positive_int,
)


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
        "--round-to",
        type=positive_int,
        default=1,
        metavar="N",
        help="keep channel counts multiples of N (8 for FP16 tensor cores, 16 for AVX-512 kernels)",
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
        "--criterion", default="l1", help="importance criterion (`carve plugins` lists them); default l1"
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
        default="uniform",
        help="how to spread the removal over layers: uniform, global, dispersion",
    )
    which.add_argument(
        "--allocator-opt",
        dest="allocator_options",
        action=KeyValues,
        default={},
        metavar="KEY=VALUE",
        help="an option of the allocator, e.g. beta=2 (repeatable)",
    )
    which.add_argument("--seed", type=int, default=0, help="seed for random criteria and sampling")
    add_calib_args(p)
    rep = p.add_argument_group("repair (no training)")
    rep.add_argument(
        "--fuse",
        choices=["exact", "lsq"],
        help="exact: fold removed filters that are positive multiples of kept ones into the consumers; "
        "lsq: refit the consumers by least squares on --calib data",
    )
    rep.add_argument(
        "--repair",
        choices=["bias", "bn"],
        help="bias: correct consumer biases for the mean shift; bn: re-estimate BatchNorm statistics",
    )
    rep.add_argument(
        "--ridge", type=non_negative_float, default=1e-3, help="ridge strength of the lsq refit (relative, >= 0)"
    )
    rep.add_argument(
        "--fuse-gate",
        type=non_negative_float,
        default=1e-3,
        help="largest relative residual for exact fusion (1e-3 = practically exact multiples)",
    )
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the ONNX Runtime check that the result equals its (repaired) reference",
    )
    add_input_shape_arg(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli._common import command_line, console, load_calib
    from pipeline.cli._progress import show_progress
    from pipeline.config import from_args
    from pipeline.flows.prune import prune_file
    from pipeline.graph import check_output_path, load
    from pipeline.pruning.prune import PruneOptions, describe_amount

    check_output_path(args.output, args.model, args.calib)
    opts = from_args(PruneOptions, args)
    model = load(args.model, input_shape=args.input_shape)
    calib = load_calib(args, model, required=opts.data_needed() or False)
    con = console(args.quiet or args.json)
    with show_progress("carve prune", con, quiet=args.quiet or args.json) as progress:
        summary = prune_file(model, args.output, opts, calib=calib, command=command_line(), progress=progress)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    pr = summary["params_after"] / summary["params_before"]
    mr = summary["macs_after"] / summary["macs_before"]
    con.print(
        f"removed {summary['channels_removed']}/{summary['channels_before']} output channels "
        f"({describe_amount(summary)}, round-to {args.round_to})"
    )
    con.print(
        f"params {summary['params_before']:,} -> {summary['params_after']:,} ({pr:.1%}); "
        f"MACs {summary['macs_before']:,} -> {summary['macs_after']:,} ({mr:.1%}, a MAC ratio, not a speed-up)"
    )
    if "repairs" in summary:
        con.print("repairs: " + ", ".join(f"{k} {v}" for k, v in summary["repairs"].items()))
    if "verify" in summary:
        v = summary["verify"]
        ref = "its repaired reference" if "repairs" in summary else "the original with the removed channels zeroed"
        con.print(
            f"verified in ONNX Runtime: output equals {ref} (max |diff| {v['max_abs_diff']:.2e}, "
            f"scale {v['scale']:.2e})"
        )
    con.print(f"wrote {args.output}")
    return 0
