"""``carve run RECIPE.yaml``: a whole pipeline from one file (model, data, passes, measurement, thresholds)."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
from pathlib import Path

from carve.pipeline.errors import CarveError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a recipe (YAML): passes, evaluation, measurement, thresholds", description=__doc__
    )
    p.add_argument("recipe", help="recipe file (see docs/passes.md, section Recipes)")
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
    p.add_argument(
        "--resume",
        action="store_true",
        help="go on from the last pass an interrupted run finished (kept in OUTPUT.resume/ until the run is done)",
    )
    p.add_argument("--json", action="store_true", help="print the report JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import command_line, console
    from carve.pipeline.cli._progress import show_progress
    from carve.pipeline.errors import CarveError
    from carve.pipeline.flows.recipe import (
        bench_recipe,
        check_recipe,
        check_thresholds,
        load_recipe,
        resume_dir,
        run_recipe,
    )
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
    with show_progress("carve run", con, quiet=args.quiet or args.json) as progress, _say_resume(args, recipe):
        original, final, report = run_recipe(
            recipe,
            keep_intermediate=Path(args.keep_intermediate) if args.keep_intermediate else None,
            progress=progress,
            command=command_line(),
            steps_dir=resume_dir(recipe),
            resume=args.resume,
        )
        save(final, recipe.output, check_inputs=inputs)
        if recipe.bench:
            progress("measure original vs final")
            report.update(bench_recipe(recipe, original, recipe.output, progress=progress))
    failures = check_thresholds(recipe, report)
    report["thresholds"] = {"limits": recipe.thresholds, "failures": failures, "passed": not failures}
    with atomic_write(report_path, inputs=[*inputs, recipe.output]) as f:
        json.dump(report, f, indent=1, default=str)
    shutil.rmtree(resume_dir(recipe), ignore_errors=True)  # done: nothing left to resume
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
        con.print(threshold_verdict(recipe.thresholds, failures))
    return 1 if failures else 0


@contextlib.contextmanager
def _say_resume(args: argparse.Namespace, recipe):
    """On Ctrl-C (or an error) after some passes finished: where they are kept and how to go on from there."""
    from carve.pipeline.flows.recipe import resume_dir

    def note() -> str | None:
        kept = sorted(resume_dir(recipe).glob("*.onnx")) if resume_dir(recipe).is_dir() else []
        if not kept:
            return None
        return (
            f"{len(kept)} finished pass(es) kept in {resume_dir(recipe)}; "
            f"`carve run {args.recipe} --resume` goes on from there"
        )

    try:
        yield
    except CarveError as exc:  # the error stays one line; where to go on from is a hint under it
        if text := note():
            exc.hint = f"{exc.hint}\n  hint: {text}" if exc.hint else text
        raise
    except BaseException:
        if text := note():
            print(f"carve run: {text}", file=sys.stderr)
        raise


def threshold_verdict(limits: dict, failures: list[str]) -> str:
    """The recipe's verdict in one line: which thresholds were checked and whether they held."""
    if not limits and not failures:
        return "thresholds: none set (the recipe's `thresholds` section); exit 0"
    names = ", ".join(f"{k} {v}" for k, v in limits.items())
    if not failures:
        return f"[green]thresholds passed[/green] ({names}); exit 0"
    return f"[red]thresholds failed[/red] ({names or 'none set: a measured slow-down fails'}): " + (
        "; ".join(failures) + "; exit 1"
    )


def _same_path(a: Path, b: Path) -> bool:
    import os

    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False
