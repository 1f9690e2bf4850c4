"""``carve export NAME -o OUT``: a zoo model to ONNX (trained weights where we have them); ``--list`` shows the zoo."""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a zoo model to ONNX", description=__doc__)
    p.add_argument("name", nargs="?", help="zoo model name (`--list` shows them)")
    p.add_argument("-o", "--output", help="ONNX file to write")
    p.add_argument("--list", action="store_true", help="list the zoo")
    p.add_argument(
        "--weights",
        default="auto",
        help="auto (trained where available: ../shared or $CARVE_SHARED, digits training for lenet5), "
        "random, or a checkpoint path",
    )
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the convolutions (default: keep it)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; 11 and newer)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    p.add_argument("--input-size", type=positive_int, help="square input size for the models that allow it")
    p.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch's TorchScript exporter (default) or the dynamo exporter (needs onnxscript)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import console
    from carve.pipeline.errors import CarveError

    con = console()
    if args.list:
        return _list(con)
    if not args.name or not args.output:
        raise CarveError("give a model name and -o OUTPUT (or --list)")
    import carve.models as models

    if args.opset < 11:
        raise CarveError(f"--opset {args.opset}: carve works with opset 11 and newer")
    with con.status(f"exporting {args.name}...", spinner="dots"):
        info = models.export(
            args.name,
            args.output,
            weights=args.weights,
            fold_bn=args.fold_bn,
            opset=args.opset,
            dynamic_batch=not args.static_batch,
            input_size=args.input_size,
            exporter=args.exporter,
        )
    for w in info.warnings:
        con.print(f"[yellow]warning:[/yellow] {w}")
    size = info.path.stat().st_size
    con.print(
        f"wrote {info.path} ({size / 1e6:.2f} MB): {info.name}, input {info.input_name} "
        f"{'x'.join(map(str, info.input_shape))}, opset {info.opset}, "
        f"BN {'folded' if info.fold_bn else 'kept'}, weights {info.weights}"
    )
    return 0


def _list(con) -> int:
    from rich.table import Table

    import carve.models as models

    t = Table(title="the carve model zoo", title_justify="left")
    for c in ("name", "input", "classes", "trained weights", "exercises"):
        t.add_column(c, overflow="fold")
    for name in models.available():
        s = models.spec(name)
        trained = "yes" if models.has_trained_weights(name) else ("missing (see ../shared)" if s.trained else "no")
        t.add_row(name, "x".join(map(str, s.input_shape)), str(s.num_classes), trained, s.exercises)
    con.print(t)
    return 0
