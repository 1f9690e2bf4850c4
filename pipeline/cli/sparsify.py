"""``carve sparsify MODEL -o OUT``: zero the least important weights (unstructured or 2:4). Reports sparsity, never a
speed-up: dense kernels run zeros as fast as anything else."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import add_calib_args, fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sparsify", help="zero weights (CEP / magnitude; unstructured or 2:4)", description=__doc__)
    p.add_argument("model", help="the ONNX model to sparsify (never overwritten)")
    p.add_argument("-o", "--output", required=True, help="where to write the sparsified ONNX file")
    p.add_argument("--sparsity", type=fraction, default=0.5, help="fraction of weights to zero (unstructured)")
    p.add_argument(
        "--criterion",
        choices=["cep", "magnitude"],
        default="magnitude",
        help="cep: cross-entropy error on labelled --calib data; magnitude: |w|",
    )
    p.add_argument("--variant", choices=["taylor", "fisher"], default="taylor", help="CEP's weight error term")
    p.add_argument("--hcep", type=fraction, default=0.0, help="HCEP: always keep this top fraction of every filter")
    p.add_argument(
        "--pattern",
        choices=["unstructured", "2:4"],
        default="unstructured",
        help="which weights may be zeroed: any, or 2 of every 4 (default unstructured)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling --calib data (default 0)")
    add_calib_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from carve.pipeline.cli._common import command_line, console, load_calib
    from carve.pipeline.config import options_for
    from carve.pipeline.data.shared import data_input
    from carve.pipeline.flows.passes import run_passes
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.passes import build, passes

    check_output_path(args.output, args.model, data_input(args.calib))
    model = load(args.model)
    data = load_calib(args, model, required="--criterion cep" if args.criterion == "cep" else False)
    p = build("sparsify", **options_for(passes.get("sparsify"), args))
    run = run_passes(args.model, args.output, [p], model=model, calib=data, seed=args.seed, command=command_line())
    summary = run.results[0].summary
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    con = console(args.quiet)
    con.print(
        f"{summary['sparsity']:.1%} of the Conv/Gemm weights are zero ({args.criterion}, {args.pattern}); "
        "shapes unchanged: dense kernels run no faster, sparse kernels (TensorRT 2:4) can"
    )
    for s in summary["skipped"]:
        con.print(f"  left dense: {s}")
    con.print(f"wrote {args.output}")
    return 0
