"""``carve demo``: the whole job end to end on a default that needs no download.

LeNet-5 is trained in seconds on scikit-learn's handwritten digits, exported to ONNX, inspected, pruned (plain, and
repaired by least squares on the training digits), verified, evaluated on held-out digits and timed side by side with
the original in ONNX Runtime.
"""

from __future__ import annotations

import argparse

from carve.pipeline.cli._common import fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train, export, inspect, prune, repair, verify and time LeNet-5 on digits", description=__doc__
    )
    p.add_argument("--out-dir", default="carve-demo", help="where to write the models and demo.json")
    p.add_argument("--ratio", type=fraction, default=0.5, help="pruning ratio (default 0.5)")
    p.add_argument("--quick", action="store_true", help="skip the timing (for tests)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    import carve.models as models
    from carve.pipeline.cli._common import command_line, console, output_folder
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import atomic_write, load, save
    from carve.pipeline.graph.channels import analyse
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.graph.overview import overview
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.pruning.prune import PruneOptions, prune_model

    con = console()
    out = output_folder(args.out_dir, "--out-dir", "give a folder for the demo's files")
    con.rule("1. train LeNet-5 on scikit-learn's digits and export it")
    from carve.models.train import lenet5_digits

    _, metrics = lenet5_digits()
    how = "loaded from the cache" if metrics["cached"] else f"trained in {metrics['seconds']}s"
    con.print(f"LeNet-5 {how}: train accuracy {metrics['train_acc']:.3f}, test accuracy {metrics['test_acc']:.3f}")
    info = models.export("lenet5", out / "lenet5.onnx")
    con.print(f"exported {info.path} (BN kept, dynamic batch, preprocessing recorded in its metadata)")

    con.rule("2. inspect: channels, groups, what can be pruned")
    original = load(info.path)
    ov = overview(original, analyse(original))
    t = Table(show_lines=False)
    for c in ("node", "op", "in", "out", "params", "MACs", "group", "prunable"):
        t.add_column(c)
    for r in ov["layers"]:
        status = f"{r['prunable']}/{r['cout']}" + (f" ({r['reason']})" if r["reason"] else "")
        t.add_row(
            r["node"],
            r["op"],
            str(r["cin"]),
            str(r["cout"]),
            f"{r['params']:,}",
            f"{r['macs']:,}",
            f"G{r['group']}",
            status,
        )
    con.print(t)

    con.rule(f"3. prune {args.ratio:.0%} of every layer's channels (L1), plain and repaired by least squares")
    calib = load_data("digits:train", model=original, samples=512)
    results = {}
    for label, repairs in (("pruned", []), ("pruned+lsq", ["lsq"])):
        # round_to 1: LeNet's 6- and 16-channel convolutions are narrower than ORT CPU's default alignment (16)
        opts = PruneOptions(criterion="l1", ratio=args.ratio, repairs=repairs, round_to=1)
        report = prune_model(original, opts, calib=calib if repairs else None, command=command_line())
        path = save(report.model, out / f"lenet5_{label.replace('+', '_')}.onnx")
        con.print(
            f"{label}: {report.channels_removed} of {report.channels_before} channels removed, checker passed, "
            f"ONNX Runtime equals its reference (max |diff| {report.verify.max_abs_diff:.1e}) -> {path}"
        )
        results[label] = (load(path), report)

    con.rule("4. accuracy on held-out digits, cost, and latency side by side")
    test = load_data("digits:test", model=original)
    rows = {"original": (original, evaluate(original, test))}
    for label, (m, _) in results.items():
        rows[label] = (m, evaluate(m, test, reference=original))
    timing = {} if args.quick else _timing(original, {k: v[0] for k, v in results.items()})
    c0 = model_cost(original)
    t = Table()
    for c in ("model", "top-1", "agreement", "params", "MACs", "latency b1 (ORT CPU, 1 thread)"):
        t.add_column(c)
    doc = {"lenet5": metrics, "models": {}}
    for label, (m, acc) in rows.items():
        c = model_cost(m)
        agree = acc.get("reference", {}).get("top1_agreement")
        lat = timing.get(label)
        t.add_row(
            label,
            f"{acc['top1']:.2%}",
            f"{agree:.2%}" if agree is not None else "-",
            f"{c.params:,} ({c.params / c0.params:.0%})",
            f"{c.macs:,} ({c.macs / c0.macs:.0%})",
            "-" if lat is None else f"{lat['median_us']:.0f} us ({lat['speedup']:.2f}x)",
        )
        doc["models"][label] = {"accuracy": acc, "params": c.params, "macs": c.macs, "latency": lat}
    con.print(t)
    if timing:
        con.print(
            "latency: median over interleaved rounds in one process; speed-up = median of per-round ratios. "
            "MAC ratios are not speed-ups."
        )
    with atomic_write(out / "demo.json") as f:
        json.dump(doc, f, indent=1, default=str)
    con.print(f"wrote {out}/ (models and demo.json)")
    return 0


def _timing(original, others: dict) -> dict:
    """Median latency of each model and its speed-up over the original, interleaved (batch 1, one thread)."""
    import time

    import numpy as np

    from carve.pipeline.runtime.ort import random_feeds, session

    sessions = {"original": session(original), **{k: session(m) for k, m in others.items()}}
    feeds = random_feeds(original, batch=1)
    for s in sessions.values():
        for _ in range(50):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(30):
        order = list(sessions) if r % 2 == 0 else list(sessions)[::-1]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(50):
                sessions[k].run(None, feeds)
            times[k].append((time.perf_counter() - t0) / 50)
    base = np.array(times["original"])
    return {
        k: {"median_us": float(np.median(v) * 1e6), "speedup": float(np.median(base / np.array(v)))}
        for k, v in times.items()
    }
