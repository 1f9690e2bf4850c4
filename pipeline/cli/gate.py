"""``carve gate REPORT.json``: exit 1 when the candidate is measurably slower than allowed (or slower than a stored
baseline), 2 when the report is unusable. Prints a Markdown summary for CI job summaries."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gate", help="fail CI on latency regressions", description=__doc__)
    p.add_argument("report", help="a `carve bench` report")
    p.add_argument("--max-slowdown", default="5%", help="allowed slow-down of B against A (default 5%%)")
    p.add_argument("--min-speedup", type=float, help="also require at least this speed-up (e.g. 1.2)")
    p.add_argument("--baseline", help="a stored report (e.g. from main): fail if the speed-up regressed against it")
    p.add_argument("--tolerance", help="allowed loss of speed-up against --baseline (default: --max-slowdown)")
    p.add_argument("--summary", metavar="FILE", help="append the Markdown summary to FILE (e.g. $GITHUB_STEP_SUMMARY)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.errors import CarveError
    from carve.pipeline.measure.gate import evaluate, parse_fraction
    from carve.pipeline.measure.report import load_report

    try:
        if args.summary:
            check_summary(args.summary, args.report, args.baseline)
        report = load_report(args.report)
        baseline = load_report(args.baseline) if args.baseline else None
        result = evaluate(
            report,
            max_slowdown=parse_fraction(args.max_slowdown),
            min_speedup=args.min_speedup,
            baseline=baseline,
            tolerance=parse_fraction(args.tolerance) if args.tolerance else None,
        )
    except CarveError as exc:
        print(f"carve gate: unusable input: {exc}", file=sys.stderr)
        return 2
    md = result.markdown()
    print(md)
    if args.summary:
        try:
            with open(args.summary, "a") as f:
                f.write(md + "\n")
        except OSError as exc:
            print(f"carve gate: unusable input: --summary {args.summary}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 0 if result.passed else 1


def check_summary(summary: str, *inputs: str | None) -> None:
    """The summary is appended to: its folder must exist, and it must not be the report or the baseline."""
    import os
    from pathlib import Path

    from carve.pipeline.errors import CarveError

    s = Path(summary)
    if not s.resolve().parent.is_dir():
        raise CarveError(f"--summary {summary}: the folder {s.resolve().parent} does not exist")
    if s.is_dir():
        raise CarveError(f"--summary {summary}: is a folder; give a file to append the summary to")
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp)
        if s.resolve() == p.resolve() or (s.exists() and p.exists() and os.path.samefile(s, p)):
            raise CarveError(f"--summary {summary}: is the report {inp}; the summary would corrupt it")
