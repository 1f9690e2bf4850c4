"""``carve decompose MODEL -o OUT``: split convolutions into a low-rank basis conv and a 1x1 coefficient conv, and
MatMul/Gemm layers into a basis and a coefficient MatMul/Gemm (EDP)."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import add_calib_args, add_input_shape_arg, fraction_keep, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decompose", help="low-rank split of convolutions and linear layers (basis + coefficients)", description=__doc__
    )
    p.add_argument("model", help="the ONNX model to decompose (never overwritten)")
    p.add_argument("-o", "--output", required=True, help="where to write the decomposed ONNX file")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--energy", type=float, help="keep this fraction of each layer's spectral energy (default 0.95)")
    rank.add_argument(
        "--error", type=float, help="largest relative output error per layer on --calib data (data-aware SVD)"
    )
    rank.add_argument(
        "--target-macs",
        type=fraction_keep,
        metavar="F",
        help="keep this fraction of the model's MACs (common energy level found by bisection)",
    )
    p.add_argument("--round-to", type=positive_int, default=1, metavar="N", help="ranks are multiples of N")
    p.add_argument("--include", action="append", default=[], metavar="NODE_PATTERN", help="only these convs")
    p.add_argument("--exclude", action="append", default=[], metavar="NODE_PATTERN", help="never these convs")
    p.add_argument(
        "--kernels",
        choices=["all", "conv", "spatial", "linear"],
        default="all",
        help="which layers: all (convs and MatMul/Gemm, default), conv (convs only), spatial (k x k convs, k > 1), "
        "linear (MatMul/Gemm only)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling --calib data (default 0)")
    add_calib_args(p)
    add_input_shape_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print every layer's decision")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import load_calib, run_pass
    from carve.pipeline.config import options_for
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.passes import build, passes

    p = build("decompose", **options_for(passes.get("decompose"), args))
    from carve.pipeline.data.shared import data_input

    check_output_path(args.output, args.model, data_input(args.calib))
    model = load(args.model, input_shape=args.input_shape)
    calib = load_calib(args, model, required="--error" if args.error is not None else False)
    return run_pass(args, [p], model=model, calib=calib)
