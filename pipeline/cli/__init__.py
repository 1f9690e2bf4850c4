"""The ``carve`` command line.

Each command lives in its own module in this package (``pipeline/cli/<command>.py``) and exposes
``add_parser(subparsers)``, which registers its arguments and sets ``func``. Modules are discovered, so adding a command
means adding a file. Command modules import heavy dependencies inside their ``run`` function, keeping ``carve --help``
fast.

Lower layers name an option the way a recipe or the Python API spells it, in backticks (`` `round_to` ``); the CLI
prints it as the current command's flag (``--round-to``) in errors and warnings (:func:`flags_for`, :func:`as_flags`).

Exit codes: 0 success, 1 user error (a :class:`~carve.pipeline.errors.CarveError`, printed as one line naming the file
or option, plus a hint line, without a traceback; also a file the system refuses to read or write, and running out of
memory), 2 usage error (argparse: a malformed or contradictory option) and, for ``carve gate``, a report too thin or
malformed to decide, 3 internal error (a bug; ``--debug`` shows the traceback), 130 interrupted. Warnings
(:class:`~carve.pipeline.errors.CarveWarning`) are one line each on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import re
import sys
import warnings

from carve.pipeline.errors import CarveError, CarveWarning


def build_parser() -> argparse.ArgumentParser:
    from carve.pipeline.version import __version__

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
    parser.set_defaults(commands=sub.choices)
    return parser


def flags_for(command: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.Action | None]]:
    """Option name -> the command's flag and its action (``round_to`` -> ``--round-to``, ``allocator`` ->
    ``--allocate``), from the parser's own destinations, plus the names a command maps itself
    (``set_defaults(option_flags={...})``)."""
    out: dict[str, tuple[str, argparse.Action | None]] = {}
    for action in command._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in out:
            out[action.dest] = (longs[0], action)
    out.update({k: (v, None) for k, v in (command.get_default("option_flags") or {}).items()})
    return out


_OPTION = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`")


def as_flags(text: str, flags: dict[str, tuple[str, argparse.Action | None]]) -> str:
    """``text`` with every `` `option` `` (or `` `option=value` ``) this command has as a flag written as that flag
    (``--option value``; a switch's value as the switch itself: `` `verify=false` `` -> ``--no-verify``); other names
    keep their backticks (a recipe key, an option of another command)."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        text, action = flags[name]
        if value is None:
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return text if value.lower() == "true" else f"--no-{text[2:]}"
        if isinstance(action, argparse._StoreFalseAction | argparse._StoreTrueAction):
            return text
        return f"{text} {value}"

    return _OPTION.sub(flag, text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"carve {args.command}"
    flags = flags_for(args.commands[args.command])
    with _warnings_as_lines(prog, flags):
        try:
            rc = args.func(args)
            return int(rc or 0)
        except CarveError as exc:
            print(f"{prog}: error: {as_flags(str(exc), flags)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            return 0
        except MemoryError:
            print(f"{prog}: error: out of memory", file=sys.stderr)
            print("  hint: use a smaller --batch / --samples, or a machine with more memory", file=sys.stderr)
            return 1
        except OSError as exc:
            if args.debug or exc.filename is None:
                if args.debug:
                    raise
                return _internal(prog, exc)
            # the system refused a file the user named (permissions, a full disk, a folder in the way)
            print(f"{prog}: error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a bug in carve, not the user's fault
            if args.debug:
                raise
            if "bad_alloc" in str(exc):  # std::bad_alloc from ONNX Runtime or torch: out of memory
                print(f"{prog}: error: out of memory ({type(exc).__name__}: std::bad_alloc)", file=sys.stderr)
                print("  hint: use a smaller --batch / --samples, or a machine with more memory", file=sys.stderr)
                return 1
            return _internal(prog, exc)


def _internal(prog: str, exc: BaseException) -> int:
    text = str(exc).strip()
    print(
        f"{prog}: internal error: {type(exc).__name__}: {text.splitlines()[0] if text else ''}\n"
        "  this is a bug in carve; rerun with `carve --debug ...` for the traceback and report it",
        file=sys.stderr,
    )
    return 3


@contextlib.contextmanager
def _warnings_as_lines(prog: str, flags: dict[str, str]):
    """carve's own warnings as one line each on stderr; other libraries' warnings are not the user's business."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CarveWarning):
            print(f"{prog}: warning: {as_flags(str(message), flags)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", CarveWarning)
        warnings.showwarning = show
        yield


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
