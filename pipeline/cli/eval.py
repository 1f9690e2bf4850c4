"""``carve eval MODEL --data DATA``: top-1/top-5 on labelled data, detection mAP on a detection set (boxes), and
agreement with a reference model."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy on labelled data, agreement with a reference", description=__doc__)
    p.add_argument("model", help="ONNX file to evaluate")
    p.add_argument("--data", required=True, help="an .npz/.npy file, a folder of class sub-folders, or `digits`")
    p.add_argument("--reference", help="the model to compare with (e.g. the unpruned original)")
    p.add_argument("--samples", type=positive_int, help="evaluate on this many samples (seeded, class-balanced)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing --samples images (default 0)")
    p.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime CPU threads (default 2)")
    p.add_argument("-o", "--output", help="write the result as a report section (JSON) that `carve report` renders")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import console, emit_json
    from carve.pipeline.cli._progress import show_progress
    from carve.pipeline.data.datasets import Preprocess, load_data
    from carve.pipeline.graph import check_output_path, load
    from carve.pipeline.measure.evaluate import evaluate

    if args.output:
        from carve.pipeline.data.shared import data_input

        check_output_path(args.output, args.model, args.reference, data_input(args.data))
    model = load(args.model)
    reference = load(args.reference) if args.reference else None
    data = load_data(
        args.data, model=model, preprocess=Preprocess.for_model(model), samples=args.samples, seed=args.seed
    )
    quiet = bool(args.json)
    with show_progress("carve eval", console(quiet), quiet=quiet) as progress:
        accuracy = evaluate(model, data, reference=reference, threads=args.threads, progress=progress)
    result = {"model": args.model, **accuracy}
    doc = {"schema_version": 1, "kind": "carve.eval", "accuracy": result}
    if emit_json(args, doc):
        return 0
    con = console()
    line = f"{args.model}: {result['samples']} samples"
    if "top1" in result:
        line += f", top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}"
    if "detection" in result:
        d = result["detection"]
        line += f", {d['boxes']} boxes: mAP@0.5 {d['map50']:.2%}, mAP@0.5:0.95 {d['map50_95']:.2%}"
    con.print(line)
    if "detection" in result.get("reference", {}):
        d = result["reference"]["detection"]
        con.print(f"{args.reference}: mAP@0.5 {d['map50']:.2%}, mAP@0.5:0.95 {d['map50_95']:.2%}")
        return _done(con, args)
    if "reference" in result:
        r = result["reference"]
        extra = f", reference top-1 {r['top1']:.2%}" if "top1" in r else ""
        con.print(
            f"agreement with {args.reference}: top-1 {r['top1_agreement']:.2%}, mean KL {r['kl_mean']:.4f}{extra}"
        )
    return _done(con, args)


def _done(con, args: argparse.Namespace) -> int:
    if args.output:
        con.print(f"wrote {args.output}")
    return 0
