"""``carve run RECIPE.yaml``: a whole pipeline from one file (model, data, passes, measurement, thresholds)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a recipe (YAML): passes, evaluation, measurement, thresholds", description=__doc__
    )
    p.add_argument("recipe", help="recipe file (see docs/recipes.md)")
    p.add_argument("--keep-intermediate", metavar="DIR", help="write the model after every pass into DIR")
    p.add_argument(
        "--out-dir",
        metavar="DIR",
        help="write the final model (and the report) into DIR instead of the recipe's `output` directory",
    )
    p.add_argument(
        "-o",
        "--report",
        help="where to write the report JSON (default: the recipe's `report`, else <output>.report.json)",
    )
    p.add_argument("--json", action="store_true", help="print the report JSON")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import command_line, console
    from carve.pipeline.cli._progress import show_progress
    from carve.pipeline.errors import CarveError
    from carve.pipeline.flows.recipe import bench_recipe, check_recipe, check_thresholds, load_recipe, run_recipe
    from carve.pipeline.graph import atomic_write, check_output_path, save

    recipe = load_recipe(args.recipe)
    check_recipe(recipe)  # every pass validated before any folder is created (issue 21)
    if args.out_dir:  # outputs only under --out-dir
        recipe.output = Path(args.out_dir) / recipe.output.name
        recipe.report = Path(args.out_dir) / recipe.report.name if recipe.report else None
    report_path = Path(args.report) if args.report else recipe.report or Path(str(recipe.output) + ".report.json")
    inputs = recipe.inputs()
    for out, what in ((recipe.output, "the model"), (report_path, "the report")):
        for inp in inputs:
            if _same_path(out, inp):
                raise CarveError(
                    f"{out}: {what} would overwrite the recipe's input {inp}; carve never overwrites its input",
                    hint="choose another `output` / `report` (or --report / --out-dir)",
                )
    if _same_path(recipe.output, report_path):
        raise CarveError(
            f"{report_path}: the report would overwrite the model the recipe writes",
            hint="give `report` (or --report) another name",
        )
    # a recipe owns the directories it names for its outputs
    for p in (recipe.output, report_path):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CarveError(f"{p}: cannot create its folder ({exc.strerror or exc})") from None
    check_output_path(recipe.output, *inputs)
    check_output_path(report_path, *inputs, recipe.output)
    con = console(args.quiet or args.json)
    with show_progress("carve run", con, quiet=args.quiet or args.json) as progress:
        original, final, report = run_recipe(
            recipe,
            keep_intermediate=Path(args.keep_intermediate) if args.keep_intermediate else None,
            progress=progress,
            command=command_line(),
        )
        save(final, recipe.output, check_inputs=inputs)
        if recipe.bench:
            progress("measure original vs final")
            report.update(bench_recipe(recipe, original, recipe.output, progress=progress))
    failures = check_thresholds(recipe, report)
    report["thresholds"] = {"limits": recipe.thresholds, "failures": failures, "passed": not failures}
    with atomic_write(report_path, inputs=[*inputs, recipe.output]) as f:
        json.dump(report, f, indent=1, default=str)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        for p in report["passes"]:
            err = f", error {p['error']['max_rel']:.2e}" if p.get("error") else ""
            con.print(f"{p['pass']}: {'changed' if p['changed'] else 'unchanged'} in {p['seconds']}s{err}")
            for d in p["details"][:6]:
                con.print(f"  {d}")
        if report.get("results"):
            from carve.pipeline.measure.report import render_results

            for line in render_results(report)[:-2]:
                con.print(line)
        c = report["cost"]
        con.print(
            f"params {c['params_ratio']:.1%}, MACs {c['macs_ratio']:.1%} of the original (MAC ratios, not speed-ups)"
        )
        acc = report.get("accuracy")
        if acc:
            o, f = acc["original"], acc["final"]
            if "top1" in o:
                con.print(f"top-1 {o['top1']:.2%} -> {f['top1']:.2%}")
            con.print(f"top-1 agreement with the original {f['reference']['top1_agreement']:.2%}")
        con.print(f"wrote {recipe.output} and {report_path}")
        for msg in failures:
            con.print(f"[red]threshold not met: {msg}[/red]")
    return 1 if failures else 0


def _same_path(a: Path, b: Path) -> bool:
    import os

    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False
