"""The ``carve`` command line.

Each command lives in its own module in this package (``pipeline/cli/<command>.py``) and exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func``. Modules are discovered, so adding a command
means adding a file. Command modules import heavy dependencies inside their ``run`` function, keeping ``carve --help``
fast.

Exit codes: 0 success, 1 user error (a :class:`~pipeline.errors.CarveError`, printed without a traceback),
2 usage error (argparse) or unusable input where a command documents it, 3 internal error (a bug; ``--debug`` shows the
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pipeline.errors import CarveError


def build_parser() -> argparse.ArgumentParser:
    from pipeline.version import __version__

    parser = argparse.ArgumentParser(
        prog="carve",
        description="Prune, decompose and merge CNNs on their ONNX graph; measure the result on real engines.",
    )
    parser.add_argument("--version", action="version", version=f"carve {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except CarveError as exc:
        print(f"carve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"carve {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug in carve, not the user's fault
        if args.debug:
            raise
        print(
            f"carve {args.command}: internal error: {type(exc).__name__}: {exc}\n"
            "  this is a bug in carve; rerun with `carve --debug ...` for the traceback and report it",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
