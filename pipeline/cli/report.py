"""``carve report REPORT.json [MORE.json ...]``: Markdown (and PNG plots) for people from carve's JSON reports."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render reports as Markdown and plots", description=__doc__)
    p.add_argument(
        "reports", nargs="+", help="bench / eval / run reports (several are merged), or one sweep results.json"
    )
    p.add_argument("-o", "--output", help="Markdown file (default: stdout)")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--title", default="carve report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.graph import atomic_write
    from pipeline.measure.report import load_report, merge, plots, to_markdown

    docs = [load_report(p) for p in args.reports]
    if len(docs) > 1 and any(d.get("kind") == "carve.sweep" for d in docs):
        from pipeline.errors import CarveError

        raise CarveError("a sweep's results.json is rendered on its own", hint="give one results.json per call")
    doc = docs[0] if len(docs) == 1 else merge(docs)
    md = to_markdown(doc, title=args.title)
    if args.plots:
        written = plots(doc, args.plots)
        md += "\n" + "\n".join(f"![{p.stem}]({p})" for p in written) + "\n"
    if args.output:
        with atomic_write(args.output) as f:
            f.write(md)
        print(f"wrote {args.output}")
    else:
        print(md)
    return 0
