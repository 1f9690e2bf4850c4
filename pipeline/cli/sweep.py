"""``carve sweep SWEEP.yaml --out-dir DIR``: every combination of the axes pruned, evaluated and measured; the
accuracy-latency Pareto front in DIR/results.json (docs/sweep.md)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from carve.pipeline.cli._common import positive_int

    p = sub.add_parser(
        "sweep", help="run a sweep (YAML): points pruned, evaluated, measured; Pareto front", description=__doc__
    )
    p.add_argument("sweep", help="sweep file (see docs/sweep.md)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="points/, models/ and results.json go here")
    p.add_argument("--resume", action="store_true", help="skip points already done with the same settings")
    p.add_argument(
        "--workers", type=positive_int, help="local processes (default: the cores divided by the threads measured)"
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on a Ray cluster: `auto` (the running cluster), `local` (start one here) or ray://HOST:PORT",
    )
    p.add_argument("--dry-run", action="store_true", help="list the points and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from carve.pipeline.cli._common import command_line, console
    from carve.pipeline.flows.sweep import LocalExecutor, expand, load_sweep, run_sweep
    from carve.pipeline.measure.report import ab_text

    sweep = load_sweep(args.sweep)
    points = expand(sweep)
    con = console(args.quiet)
    if args.dry_run:
        for p in points:
            con.print(p.id)
        con.print(f"{len(points)} points")
        return 0
    if args.ray:
        from carve.pipeline.flows.sweep_ray import RayExecutor

        executor = RayExecutor(args.ray)
        executor.connect()  # fails here, before any work, when Ray is missing or unreachable
    else:
        executor = LocalExecutor(workers=args.workers)
    tty = sys.stdout.isatty() and not args.quiet
    state = {"done": 0, "failed": 0, "skipped": 0, "running": 0, "t0": time.perf_counter(), "spent": []}
    total = len(points)

    def eta() -> str:
        left = total - state["done"] - state["failed"] - state["skipped"]
        if not state["spent"] or left == 0:
            return "-"
        wall = (time.perf_counter() - state["t0"]) / len(state["spent"])
        return f"{wall * left:.0f}s"

    def line(p, rec) -> str:
        if rec["status"] != "ok":
            return f"{p.id}: [red]failed[/red] ({rec['error']})"
        acc = f"top-1 {rec['top1']:.2%}" if rec.get("top1") is not None else f"agreement {rec['top1_agreement']:.2%}"
        sp = rec["speedup"]
        figures = ab_text(
            rec["latency_ms_original"],
            rec["latency_ms_measured"],
            sp["median"],
            (sp["ci_low"], sp["ci_high"]),
            rec.get("clock"),
            a="original",
            b="pruned",
        )
        return f"{p.id}: {acc}, MACs {rec['macs_ratio']:.1%}, {figures}, {rec['seconds']:.0f}s"

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=con,
        transient=True,
        disable=not tty,
    ) as bar:
        task = bar.add_task("sweep", total=total, status="")

        def status() -> str:
            return (
                f"done {state['done']}, running {state['running']}, failed {state['failed']}, "
                f"skipped {state['skipped']}, ETA {eta()}"
            )

        def on_event(kind: str, p, rec) -> None:
            if kind == "skipped":
                state["skipped"] += 1
                bar.advance(task)
                if not tty:
                    con.print(f"{p.id}: done before (--resume), skipped")
            elif kind == "started":
                state["running"] += 1
                if not tty:
                    con.print(f"{p.id}: started")
            else:
                state["running"] -= 1
                state["failed" if rec["status"] != "ok" else "done"] += 1
                state["spent"].append(rec["seconds"])
                bar.advance(task)
                n = state["done"] + state["failed"] + state["skipped"]
                con.print(f"[{n}/{total}] {line(p, rec)}" + ("" if tty else f"; {status()}"))
            bar.update(task, status=status())

        results = run_sweep(
            sweep, args.out_dir, executor=executor, resume=args.resume, command=command_line(), on_event=on_event
        )
    s = results["summary"]
    con.print(f"{s['ok']} of {s['points']} points done, {s['failed']} failed; Pareto front: {', '.join(s['pareto'])}")
    results_json = Path(args.out_dir) / "results.json"  # `--out-dir sweep/` must not print sweep//results.json
    con.print(f"wrote {results_json} (carve report {results_json} -o sweep.md --plots plots/)")
    return 1 if s["ok"] == 0 else 0
