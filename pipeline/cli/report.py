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
    p.add_argument("--title", default="carve report", help="the Markdown heading (default: carve report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.graph import atomic_write, check_output_path
    from carve.pipeline.measure.report import load_report, merge, plots, to_markdown

    if args.output:
        check_output_path(args.output, *args.reports)
    if args.plots:
        check_plot_dir(args.plots, args.reports, args.output)
    docs = [load_report(p) for p in args.reports]
    if len(docs) > 1 and any(d.get("kind") == "carve.sweep" for d in docs):
        from carve.pipeline.errors import CarveError

        raise CarveError("a sweep's results.json is rendered on its own", hint="give one results.json per call")
    doc = docs[0] if len(docs) == 1 else merge(docs)
    where = args.reports[0] if len(args.reports) == 1 else "the reports"
    if doc.get("kind") == "carve.sweep":
        from carve.pipeline.measure.sweep_report import check_sweep_doc

        check_sweep_doc(doc, where)
    try:
        md = to_markdown(doc, title=args.title)
        if args.plots:
            written = plots(doc, args.plots)
            md += "\n" + "\n".join(f"![{p.stem}]({p})" for p in written) + "\n"
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # a hand-edited or truncated report: a field missing or of the wrong type, named (issue 21)
        from carve.pipeline.errors import CarveError, first_line

        what = f"field {exc.args[0]!r} missing" if isinstance(exc, KeyError) else first_line(exc)
        raise CarveError(
            f"{where}: a malformed report ({what})", hint="render the file carve wrote, unedited"
        ) from None
    if args.output:
        with atomic_write(args.output, inputs=args.reports) as f:
            f.write(md)
        print(f"wrote {args.output}")
    else:
        print(md)
    return 0


def check_plot_dir(directory: str, reports: list[str], output: str | None) -> None:
    """--plots names a folder (made when missing); never a file, and the plots never land on an input."""

    from carve.pipeline.cli._common import output_folder
    from carve.pipeline.graph import check_output_path

    d = output_folder(directory, "--plots", "give a folder for the PNG plots")
    for name in ("latency.png", "speedup.png"):
        check_output_path(d / name, *reports, output)
