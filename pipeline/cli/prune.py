"""``carve prune MODEL -o OUT``: physically remove the least important channels, verify, and save."""

from __future__ import annotations

import argparse
import json

from ._common import fraction, fraction_keep, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels (physically smaller model)", description=__doc__)
    p.add_argument("model", help="ONNX file to prune (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned ONNX file")
    p.add_argument(
        "--ratio", type=fraction, default=0.5, help="fraction of each group's channels to remove (0.5, 30%%)"
    )
    p.add_argument(
        "--target-macs",
        type=fraction_keep,
        metavar="F",
        help="instead of --ratio: keep this fraction of the MACs (the ratio is found by bisection)",
    )
    p.add_argument(
        "--target-params",
        type=fraction_keep,
        metavar="F",
        help="instead of --ratio: keep this fraction of the parameters",
    )
    p.add_argument("--criterion", default="l1", help="importance criterion (`carve plugins` lists them); default l1")
    p.add_argument("--allocate", dest="allocator", default="uniform", help="how to spread the removal; default uniform")
    p.add_argument(
        "--round-to",
        type=positive_int,
        default=1,
        metavar="N",
        help="keep channel counts multiples of N (8 for FP16 tensor cores, 16 for AVX-512 blocked kernels)",
    )
    p.add_argument("--keep-min", type=positive_int, default=1, metavar="N", help="keep at least N channels per layer")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NODE_PATTERN",
        help="never prune channels that these nodes produce or read (glob on node names; repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random criteria")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the ONNX Runtime check that the result equals the original with those channels zeroed",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import load, save
    from ..channels import analyse
    from ..graph import check_output_path
    from ..planning import plan
    from ..surgery import prune, zero_removed
    from ._common import command_line, console

    check_output_path(args.output, args.model)
    model = load(args.model)
    analysis = analyse(model)
    p = plan(
        analysis,
        criterion=args.criterion,
        ratio=args.ratio,
        round_to=args.round_to,
        keep_min=args.keep_min,
        exclude=args.exclude,
        allocator=args.allocator,
        seed=args.seed,
        target_macs=args.target_macs,
        target_params=args.target_params,
    )
    reference = zero_removed(model, p) if args.verify else None
    pruned = prune(model, p, command=command_line(), inplace=True)
    check = verify_against(reference, pruned) if reference is not None else None
    save(pruned, args.output, check_inputs=[args.model])
    summary = json.loads(pruned.metadata()["carve.prune"])
    if check is not None:
        summary["verify"] = check
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    con = console(args.quiet)
    pr = summary["params_after"] / summary["params_before"]
    mr = summary["macs_after"] / summary["macs_before"]
    how = f"ratio {summary['options']['ratio']:.3g}"
    target = args.target_macs or args.target_params
    if target:
        how += f" found for target {'MACs' if args.target_macs else 'params'} {target:g}"
    con.print(
        f"removed {summary['channels_removed']}/{summary['channels_before']} output channels "
        f"({summary['criterion']}, {summary['allocator']} {how}, round-to {args.round_to})"
    )
    con.print(
        f"params {summary['params_before']:,} -> {summary['params_after']:,} ({pr:.1%}); "
        f"MACs {summary['macs_before']:,} -> {summary['macs_after']:,} ({mr:.1%}, a MAC ratio, not a speed-up)"
    )
    if check is not None:
        con.print(
            f"verified in ONNX Runtime: output equals the original with the removed channels zeroed "
            f"(max |diff| {check['max_abs_diff']:.2e}, scale {check['scale']:.2e})"
        )
    con.print(f"wrote {args.output}")
    return 0


def verify_against(reference, pruned, *, seed: int = 0, rtol: float = 1e-4) -> dict:
    """Run both in ONNX Runtime on the same random batch; they must agree (relative to the output scale)."""
    import numpy as np

    from ..errors import CarveError
    from ..ortutil import random_feeds, run

    feeds = random_feeds(reference, batch=2, seed=seed)
    a, b = run(reference, feeds), run(pruned, feeds)
    worst, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise AssertionError(f"pruned output shape {y.shape} != {x.shape}")
        if np.issubdtype(x.dtype, np.floating):
            worst = max(worst, float(np.abs(x - y).max(initial=0)))
            scale = max(scale, float(np.abs(x).max(initial=0)))
    if worst > rtol * max(scale, 1e-6) + 1e-6:
        raise CarveError(
            f"verification failed: the pruned model differs from its reference by {worst:.3g} "
            f"(output scale {scale:.3g}); please report this model",
            hint="--no-verify skips the check",
        )
    return {"max_abs_diff": worst, "scale": scale}
