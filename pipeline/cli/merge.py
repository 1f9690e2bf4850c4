"""``carve merge MODEL -o OUT``: fold BN into convs and merge adjacent linear layers (decomposed pairs) back."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="exact merging: BN folding, basis+coefficient pairs, linear chains", description=__doc__
    )
    p.add_argument("model", help="the ONNX model to merge (never overwritten)")
    p.add_argument("-o", "--output", required=True, help="where to write the merged ONNX file")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNormalization into the preceding layers first")
    p.add_argument(
        "--when",
        choices=["always", "macs", "slower"],
        default="always",
        help="merge every pair; only when it saves MACs; or only when the pair runs slower than the "
        "merged layer on --backend (timed, interleaved)",
    )
    p.add_argument("--backend", default="ort", help="backend for --when slower (default ort)")
    p.add_argument("--threads", type=positive_int, default=1, help="threads for --when slower timing")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size for --when slower timing")
    p.add_argument("-v", "--verbose", action="store_true", help="print every candidate's decision")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import run_pass
    from carve.pipeline.passes import build

    passes = [build("fold_bn")] if args.fold_bn else []
    passes.append(build("merge", when=args.when, backend=args.backend, threads=args.threads, batch=args.batch))
    return run_pass(args, passes)
