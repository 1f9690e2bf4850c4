"""``carve quantize MODEL -o OUT --calib DATA``: static INT8 (QDQ) through ONNX Runtime's quantizer, with the loss
measured on the calibration data; ``--keep-fp32 auto --max-drop 0.5`` keeps the most sensitive nodes in FP32 until
the drop is within the budget. Prune first, then quantize."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import add_calib_args, add_input_shape_arg, non_negative_float


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="INT8 (QDQ) through ONNX Runtime's quantizer, loss measured", description=__doc__
    )
    p.add_argument("model", help="the FP32 ONNX model to quantize (pruned or not); it is never overwritten")
    p.add_argument("-o", "--output", required=True, help="where the QDQ INT8 model is written (atomically)")
    p.add_argument(
        "--calibration",
        dest="method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="how activation ranges are calibrated (default minmax)",
    )
    p.add_argument(
        "--keep-fp32",
        dest="keep_fp32",
        action="append",
        default=[],
        metavar="NODE_PATTERN|auto",
        help="keep these nodes in FP32 (repeatable); `auto`: the most sensitive ones until --max-drop holds",
    )
    p.add_argument(
        "--max-drop",
        type=non_negative_float,
        default=0.5,
        help="budget in points: top-1 accuracy lost (labelled data) or top-1 disagreement with FP32 (default 0.5)",
    )
    p.add_argument(
        "--activations",
        choices=["uint8", "int8"],
        default="uint8",
        help="uint8 asymmetric (ORT / OpenVINO CPU, default) or int8 symmetric (TensorRT)",
    )
    p.add_argument("--per-tensor-weights", dest="per_channel", action="store_false", help="one weight scale per tensor")
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights (CPUs without VNNI)")
    p.add_argument("--include", action="append", metavar="NODE_PATTERN", help="quantize only these nodes")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling the calibration images (default 0)")
    add_calib_args(p)
    add_input_shape_arg(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-node sensitivity ranking")
    p.add_argument("--report", metavar="JSON", help="write the pass's summary (agreement, kept nodes, kernels)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run, option_flags={"keep_fp32": "--keep-fp32", "method": "--calibration"})


def run(args: argparse.Namespace) -> int:
    import json

    from carve.pipeline.cli._common import command_line, console, emit_json, load_calib
    from carve.pipeline.flows.passes import run_passes
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.passes import build

    check_output_path(args.output, args.model, args.calib)
    if args.report:
        check_output_path(args.report, args.model, args.calib, args.output)
    model = load(args.model, input_shape=args.input_shape)
    calib = load_calib(args, model, required="carve quantize")
    p = build(
        "quantize",
        method=args.method,
        keep_fp32=args.keep_fp32,
        max_drop=args.max_drop,
        activations=args.activations,
        per_channel=args.per_channel,
        reduce_range=args.reduce_range,
        include=args.include,
    )
    con = console(args.quiet or args.json)
    with con.status("calibrating and quantizing...", spinner="dots"):
        run = run_passes(args.model, args.output, [p], model=model, calib=calib, seed=args.seed, command=command_line())
    s = run.results[0].summary
    if args.report:
        emit_json(argparse.Namespace(json=False), s, args.report)
    if args.json:
        print(json.dumps(s, indent=1, default=str))
        return 0
    con.print(
        f"INT8 QDQ ({s['calibration']} calibration, {s['calibration_samples']} samples): "
        f"{s['int8_compute_nodes']} of {s['compute_nodes']} Conv/Gemm/MatMul nodes in INT8; weights "
        f"{s['weight_bytes']['fp32'] / 1e6:.2f} MB -> {s['weight_bytes']['int8'] / 1e6:.2f} MB"
    )
    for name, d in s["agreement"]["outputs"].items():
        parts = (
            [f"max error {d['max_abs_error']:.3g}", f"mean {d['mean_abs_error']:.3g}"] if "max_abs_error" in d else []
        )
        if "top1_agreement" in d:
            parts.append(f"top-1 agreement {d['top1_agreement']:.2%}")
        if "top1_int8" in d:
            parts.append(f"top-1 FP32 {d['top1_fp32']:.2%} -> INT8 {d['top1_int8']:.2%}")
        con.print(f"  {name}: " + ", ".join(parts) + " (on the calibration data)")
    b = s["budget"]
    con.print(f"drop {b['drop']:.3g} ({b['measure']}); budget {b['max_drop']:g}: {'met' if b['met'] else 'NOT met'}")
    for k in s["kept_fp32"]:
        con.print(f"  kept FP32: {k['node']}: {k['why']}")
    if args.verbose:
        for r in s.get("sensitivity", []):
            con.print(f"  sensitivity {r['rank']:>3}: {r['node']} ({r['op']}) NMSE {r['nmse']:.3g}")
    if "kernels" in s:
        k = s["kernels"]
        ints = ", ".join(f"{op} x{c}" for op, c in k["integer_ops"].items()) or "none"
        flt = ", ".join(f"{op} x{c}" for op, c in k["float_compute_ops"].items()) or "none"
        con.print(f"ONNX Runtime CPU runs it as {k['verdict']}: integer kernels {ints}; float compute {flt}")
    con.print(f"wrote {args.output}")
    return 0
