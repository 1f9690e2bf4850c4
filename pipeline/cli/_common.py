"""Helpers shared by the command modules: argument types, the command line recorded in metadata, console output."""

from __future__ import annotations

import argparse
import shlex
import sys

from carve.pipeline.errors import CarveError


def command_line() -> str:
    """The command as the user typed it (recorded in the metadata of every model carve writes). Arguments that are
    not valid UTF-8 (file names are bytes) are recorded with backslash escapes."""
    import os

    args = [os.fsencode(a).decode("utf-8", "backslashreplace") for a in sys.argv[1:]]
    return " ".join(["carve", *map(shlex.quote, args)])


def fraction(text: str) -> float:
    """A fraction in [0, 1): ``0.3`` or ``30%``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1): {text!r}")
    return value


def fraction_keep(text: str) -> float:
    """A fraction in (0, 1] of the original to keep: ``0.5`` or ``50%``."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (NaN, Inf and negative values are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (``profile --min-round-ms``: a round of no time measures nothing)."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def input_shape(text: str) -> tuple[int, ...]:
    """``3x224x224`` (channels x height x width; the batch stays as the model declares it) or ``1x3x224x224``."""
    try:
        dims = tuple(int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3x224x224, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3x224x224, got {text!r}")
    return dims


def add_input_shape_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        type=input_shape,
        metavar="CxHxW",
        help="the input size to analyse the model at when its input dimensions are dynamic (e.g. 3x224x224)",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0: {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """``1,8,32`` -> [1, 8, 32]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a value is repeated: {text!r}")
    return values


def output_folder(path, flag: str, hint: str):
    """``path`` as a folder that exists (made when missing); a file there, or a folder that cannot be made, is a
    one-line error naming ``flag``."""
    from pathlib import Path

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CarveError(f"{flag} {path}: is a file, not a folder", hint=hint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CarveError(f"{flag} {path}: cannot create the folder ({exc.strerror or exc})") from None
    return folder


def console(quiet: bool = False):
    """A rich console on stdout; quiet prints nothing. Piped output gets a wide page so tables stay one row a line."""
    import os

    from rich.console import Console

    # messages never wrap (soft_wrap); tables use the terminal's width, or a wide page when piped
    width = None if sys.stdout.isatty() else int(os.environ.get("CARVE_COLUMNS", "200"))
    return Console(quiet=quiet, highlight=False, soft_wrap=True, width=width)


def emit_json(args: argparse.Namespace, doc: dict, output: str | None = None) -> bool:
    """Write ``doc`` to ``output`` (default ``args.output``) atomically when one is given, and print it with
    ``--json``. Returns whether it was printed (the command then prints nothing else)."""
    import json

    from carve.pipeline.graph.io import atomic_write

    output = output if output is not None else getattr(args, "output", None)
    if output:
        with atomic_write(output) as f:
            json.dump(doc, f, indent=1, default=str)
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=1, default=str))
        return True
    return False


def require(condition: bool, message: str, hint: str | None = None) -> None:
    if not condition:
        raise CarveError(message, hint=hint)


def key_values(text: str) -> dict:
    """``key=value`` -> {key: value}, the value read as a YAML scalar (numbers, booleans, strings)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    from carve.pipeline.config import load_yaml
    from carve.pipeline.errors import CarveError

    key, value = text.split("=", 1)
    try:
        return {key.strip(): load_yaml(value, f"`{key.strip()}`")}
    except CarveError as exc:
        if "YAML" in exc.message and "not valid YAML" not in exc.message:
            raise argparse.ArgumentTypeError(exc.message) from None
        return {key.strip(): value}


class KeyValues(argparse.Action):
    """``--opt KEY=VALUE`` (repeatable) gathered into one dict; values read as YAML scalars."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            pair = key_values(values)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **pair})


def add_calib_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration data: an .npz/.npy file, a folder with one sub-folder per class, or `digits`",
    )
    g.add_argument("--samples", type=positive_int, default=512, help="how many calibration samples (default 512)")
    g.add_argument(
        "--labels", action="store_true", help="the calibration data must carry labels (loss-based criteria need them)"
    )
    g.add_argument("--mean", type=_floats, help="override the normalisation mean, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", type=_floats, help="override the normalisation std, e.g. 0.229,0.224,0.225")


def _floats(text: str) -> tuple[float, ...]:
    import math

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers: {text!r}")
    return values


def load_calib(args: argparse.Namespace, model, *, required: bool | str):
    """The calibration Dataset the arguments name (None when not given and not required).

    ``required`` may be a string saying who needs the data; it goes into the error message."""
    from carve.pipeline.data.datasets import Preprocess, load_data

    if args.calib is None:
        if required:
            who = required if isinstance(required, str) else "this command"
            raise CarveError(f"{who} needs calibration data", hint="give --calib FILE.npz | FOLDER | digits")
        return None
    pre = Preprocess.for_model(model)
    if args.mean:
        pre.mean = args.mean
    if args.std:
        if any(v <= 0 for v in args.std):
            raise CarveError(f"--std {','.join(map(str, args.std))}: every std must be above 0")
        pre.std = args.std
    data = load_data(args.calib, model=model, preprocess=pre, samples=args.samples, seed=args.seed)
    if args.labels and data.labels is None:
        raise CarveError(
            f"--labels: {args.calib} has no labels",
            hint="an .npz with a `labels` array, or a folder with one sub-folder per class",
        )
    return data


def run_pass(args: argparse.Namespace, passes: list, *, model=None, calib=None) -> int:
    """Run passes on ``args.model`` into ``args.output`` (:func:`carve.pipeline.flows.passes.run_passes`) and print
    their decisions, their error and the cost change."""
    import json

    from carve.pipeline.flows.passes import run_passes
    from carve.pipeline.graph.cost import model_cost

    con = console(getattr(args, "quiet", False) or getattr(args, "json", False))
    with con.status("running " + ", ".join(p.name for p in passes) + "...", spinner="dots"):
        run = run_passes(
            args.model,
            args.output,
            passes,
            model=model,
            calib=calib,
            seed=getattr(args, "seed", 0),
            command=command_line(),
        )
    if getattr(args, "json", False):
        print(json.dumps(run.summary(), indent=1))
        return 0
    c0, c1 = model_cost(run.before), model_cost(run.after)
    for p, r in zip(run.passes, run.results):
        shown = r.details if getattr(args, "verbose", False) else r.details[:12]
        for d in shown:
            con.print(f"  {p.name}: {d}")
        if len(r.details) > len(shown):
            con.print(f"  {p.name}: ... {len(r.details) - len(shown)} more (--verbose)")
        if r.error is not None:
            kind = "verified exact" if p.exact else "output error"
            con.print(
                f"{p.name}: {kind} in ONNX Runtime (max relative {r.error['max_rel']:.2e}, "
                f"cosine {r.error['cosine']:.6f})"
            )
    con.print(
        f"params {c0.params:,} -> {c1.params:,} ({c1.params / c0.params:.1%}); MACs {c0.macs:,} -> "
        f"{c1.macs:,} ({c1.macs / c0.macs:.1%}, a MAC ratio, not a speed-up)"
    )
    con.print(f"wrote {args.output}")
    return 0
