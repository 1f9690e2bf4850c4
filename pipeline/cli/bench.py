"""``carve bench A.onnx B.onnx``: measure two models side by side on one engine (latency, throughput, speed-up with a
confidence interval, MAC ratio, memory, agreement) and write a report."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import int_list, non_negative_float, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure two models side by side (speed-up with a confidence interval)", description=__doc__
    )
    p.add_argument("a", help="baseline model (e.g. the original)")
    p.add_argument("b", help="candidate model (e.g. the pruned one)")
    p.add_argument("--backend", default="ort", help="ort | trt | torch-cuda | torch-cpu (default ort)")
    p.add_argument("--device", default="cpu", help="ort: cpu | cuda | tensorrt execution provider (default cpu)")
    p.add_argument("--batch", type=int_list, default=[1], help="batch sizes, e.g. 1,8")
    p.add_argument("--threads", type=int_list, default=[1], help="CPU threads, e.g. 1,2")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="engine precision (default fp32)")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture each run in a CUDA graph (default: on for torch-cuda and trt, off for ort; ort: cuda/tensorrt "
        "devices only)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch backends: convolution weights and activations in channels_last (default: on for CUDA)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch backends: torch.compile (inductor) the runner's static graph"
    )
    p.add_argument(
        "--provider-option",
        dest="provider_options",
        action=KeyValue,
        default={},
        metavar="KEY=VALUE",
        help="ort GPU providers: an execution-provider option (repeatable), e.g. cudnn_conv_algo_search=HEURISTIC",
    )
    p.add_argument("--rounds", type=positive_int, default=20, help="interleaved rounds (default 20)")
    p.add_argument(
        "--min-round-ms", type=non_negative_float, default=50.0, help="minimum time of one model's round (default 50)"
    )
    p.add_argument(
        "--warmup-ms", type=non_negative_float, default=300.0, help="untimed runs of each model first (default 300)"
    )
    p.add_argument("--isolate", action="store_true", help="run each model in its own process")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu", "auto"],
        default="wall",
        help="CPU timing: wall clock (default), or the thread's CPU time (one thread; steadier on a shared machine)",
    )
    p.add_argument(
        "--spinning",
        action="store_true",
        help="ort: let idle threads spin-wait (ORT's default; off here because an idle model's spinning "
        "threads steal CPU from the timed one on shared cores)",
    )
    p.add_argument("--data", help="agreement on these inputs (an .npz/.npy, a folder, or digits) instead of random")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process memory runs")
    p.add_argument(
        "--no-agreement", dest="agreement", action="store_false", help="skip comparing the two models' outputs"
    )
    p.add_argument(
        "--by-op",
        action="store_true",
        help="ort: break each model's kernel time down by op type with ONNX Runtime's profiler (first batch and "
        "thread count; --rounds profiled runs each) and show the share table",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs and the bootstrap (default 0)")
    p.add_argument("-o", "--output", help="report JSON (default: print the summary only)")
    p.add_argument("--json", action="store_true", help="print the report JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


class KeyValue(argparse.Action):
    """``--opt KEY=VALUE`` (repeatable) into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} takes KEY=VALUE, got {values!r}")
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), key: value})


def run(args: argparse.Namespace) -> int:

    from carve.pipeline.cli._common import command_line, console, emit_json
    from carve.pipeline.cli._progress import show_progress
    from carve.pipeline.config import from_args
    from carve.pipeline.graph import check_output_path
    from carve.pipeline.measure.backends import get
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig
    from carve.pipeline.measure.report import render_agreement, render_results

    if args.output:
        from carve.pipeline.data.shared import data_input

        check_output_path(args.output, args.a, args.b, data_input(args.data))
    get(args.backend).require()
    cfg = from_args(MeasureConfig, args)
    con = console(args.quiet or args.json)
    with show_progress("carve bench", con, quiet=args.quiet or args.json) as progress:
        report = compare(args.a, args.b, cfg, command=command_line(), progress=progress)
    if emit_json(args, report):
        return 0
    for line in render_results(report):
        con.print(line)
    if "agreement" in report:
        con.print(render_agreement(report)[0])
    if "by_op" in report:
        from carve.pipeline.measure.op_profile import by_op_table

        con.print("")
        for line in by_op_table(report):
            con.print(line)
    if args.output:
        con.print(f"wrote {args.output}")
    return 0
