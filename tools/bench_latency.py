"""Benchmark latency-aware pruning: latency tables, the latency knapsack against the ratio allocators at the same
measured latency, and the channel alignment ONNX Runtime's CPU kernels want.

For each model (ResNet-18, ResNet-50, MobileNetV2 and VGG-16-BN at ImageNet shapes, 3x224x224, random weights;
CIFAR ResNet-56 with its trained weights), on ONNX Runtime CPU, one thread, batch 1:

1. profile the latency table (fresh, timed; its validation on whole pruned models gives the table's error);
2. for each target (0.7 and 0.5 of the original's latency): the ``latency`` allocator (knapsack over the table's
   fast widths) through the closed loop of ``carve prune --target-latency``; then ``uniform`` and ``global`` (round-to
   16) aimed by the same closed loop at the latency the knapsack's model *measured*, so all three are compared at the
   same measured latency;
3. every chosen model measured once more against the original (interleaved rounds, the thread's CPU clock; a
   wall-clock measurement beside it), its MAC ratio, and its kept importance (the share of the criterion's importance
   its kept channels hold, on the knapsack's own scale: Taylor for ResNet-56, L1 for the random-weight models, each
   divided by its group's mean and weighted by the layers the group passes through);
4. at the latency-aware model's MAC ratio (equal MACs): ``uniform`` and ``knapsack`` (the same knapsack with MACs
   as its exact cost, round-to 16 or 8), which shows what comparing groups on one importance scale buys without a
   latency table;
5. ResNet-56: top-1 on 2,000 test images without repair and after the least-squares repair (``--fuse lsq``, 256
   calibration images) for every row; and for uniform and global, top-1 at exactly the knapsack's measured latency,
   read from a line through five of their models around it (each measured and repaired);
6. alignment: every model pruned by L1 to the same MAC target with round-to 8 and round-to 16, speed-up against the
   original (this decides ``--round-to``'s default on ORT CPU).

    python tools/bench_latency.py                          # -> benchmarks/latency.json (about an hour)
    python tools/bench_latency.py --models resnet56 --targets 0.7 --no-repair -o /tmp/l.json   # smoke test
    python tools/bench_latency.py --resume --repeats 3     # each model three times, each with a fresh table
    python tools/bench_latency.py --markdown
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchio import document, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg16_bn", "resnet56"]
IMAGENET = {"resnet18", "resnet50", "mobilenet_v2", "vgg16_bn"}
ALLOCATORS = ["uniform", "global"]
EQUAL_MACS = ["uniform", "knapsack"]
CURVE = [0.8, 0.9, 1.1, 1.25]  # MAC targets around the latency-matched plan, for the equal-latency fit
ALIGN_TARGET = {"resnet56": 0.6}  # its 16-channel stage cannot go below 16 with round-to 16


def export(name: str, path: Path) -> None:
    """The zoo model; VGG-16-BN at ImageNet shapes is torchvision's (the zoo's is the CIFAR variant)."""
    from carve import models

    if name != "vgg16_bn":
        models.export(name, path)
        return
    import torch
    import torchvision

    from carve.models.export import to_onnx
    from carve.pipeline.graph import save

    torch.manual_seed(0)
    net = torchvision.models.vgg16_bn(weights=None).eval()
    save(to_onnx(net, (1, 3, 224, 224), ["logits"]), path)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def final_measure(a: Path, b: Path, rounds: int, clock: str) -> dict:
    from carve.pipeline.measure.ab import measure_pair
    from carve.pipeline.measure.config import MeasureConfig

    cfg = MeasureConfig(rounds=rounds, min_round_ms=50, warmup_ms=200, clock=clock, memory=False, agreement=False)
    r = measure_pair(a, b, cfg, 1, 1)
    s = r["speedup"]
    return {
        "ratio": 1 / s["median"],
        "speedup": s["median"],
        "ci": [s["ci_low"], s["ci_high"]],
        "a_ms": r["a"]["median_ms"],
        "b_ms": r["b"]["median_ms"],
        "clock": r["a"]["engine"]["clock"],
    }


def kept_importance(analysis, scores, frozen, removed, criterion: str) -> float:
    """The share of the importance the knapsack maximises (its ``norm=auto`` scale) that the kept channels hold."""
    from carve.pipeline.pruning.allocator import Allocation
    from carve.plugins.allocators.knapsack import LatencyKnapsack

    s = LatencyKnapsack().importance(Allocation(analysis, scores.values, frozen, 0.0, criterion=criterion))
    prunable = ~frozen
    return float(s[prunable & ~removed].sum() / s[prunable].sum())


def bench_model(name: str, args, tmp: Path, alignment: bool = True) -> dict:
    from carve import analyse, load, prune, save
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import shared_file
    from carve.pipeline.errors import CarveError
    from carve.pipeline.graph.cost import CostModel
    from carve.pipeline.graph.rewrite import ensure_biases
    from carve.pipeline.graph.surgery import zero_removed
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.measure.oracle import MeasuredLatency
    from carve.pipeline.measure.profile import ProfileSettings
    from carve.pipeline.pruning.closed_loop import closed_loop, tolerance
    from carve.pipeline.pruning.planner import Widths, plan, score
    from carve.pipeline.pruning.repair import repairs
    from carve.pipeline.pruning.targets import Target

    src = tmp / f"{name}.onnx"
    export(name, src)
    model = load(src)
    trained = name == "resnet56"
    if trained and args.repair:
        ensure_biases(model)  # the refit's intercept needs a bias; add it before profiling (same structure after)
        save(model, tmp / f"{name}_b.onnx")
        src = tmp / f"{name}_b.onnx"
        model = load(src)
    an = analyse(model)
    oracle = MeasuredLatency(profiling=ProfileSettings(cache=not args.fresh_tables), rounds=args.loop_rounds)
    load0 = load_avg()
    t0 = time.time()
    lut = oracle.table(model)
    profile_seconds = time.time() - t0
    print(f"{name}: table in {profile_seconds:.0f} s, error {lut.error.get('points')}", file=sys.stderr, flush=True)
    bound = lut.bind(an)
    calib = evalset = None
    criterion = "l1"
    if trained:
        criterion = "taylor"
        calib = load_data(shared_file("data", "cifar10", "train_subset.npz"), model=model, samples=256, seed=0)
        evalset = load_data(shared_file("data", "cifar10", "test.npz"), model=model, samples=args.eval_samples, seed=1)
    scores = score(an, criterion, calib=calib)
    cost = CostModel(an)
    frozen = an.unit_frozen
    doc: dict = {
        "model": name,
        "input": "3x32x32" if name == "resnet56" else "3x224x224",
        "weights": "trained (CIFAR-10)" if trained else "random",
        "criterion": criterion,
        "original_ms": lut.model_ms,
        "profile": {**lut.profile, "seconds_here": round(profile_seconds, 1)},
        "table_error": lut.error,
        "stated_error": lut.stated_error,
        "load_before": load0,
        "rows": [],
    }
    if trained:
        doc["original_top1"] = evaluate(model, evalset)["top1"]

    def aligned(allocator: str, target, latency=None):
        """``plan`` at round-to 16 (ORT CPU's default), or 8 when 16 cannot reach the target (ResNet-56's 16-channel
        stage): the plan and the alignment used."""
        for round_to in (16, 8):
            try:
                widths = Widths(round_to=round_to)
                return plan(an, target, scores=scores, allocator=allocator, widths=widths, latency=latency), round_to
            except CarveError:
                if round_to == 8:
                    raise
        raise AssertionError("unreachable")

    def reach(allocator: str, goal: float):
        """The allocator's plan through the closed loop, at the alignment :func:`aligned` finds for the goal."""
        first, round_to = aligned(allocator, Target("latency", min(goal, 1.0)), latency=bound)

        def replan(budget: float):
            return plan(
                an,
                Target("latency", budget),
                scores=scores,
                allocator=allocator,
                widths=Widths(round_to=round_to),
                latency=bound,
            )

        p, loop = closed_loop(
            model, an, first, replan, Target("latency", goal), oracle, error=tolerance(lut.stated_error)
        )
        return p, {**loop.to_json(), "round_to": round_to}

    def row(target: float, allocator: str, p, loop: dict | None, label: str | None = None, wall: bool = True) -> dict:
        path = tmp / f"{name}_{target}_{label or allocator}.onnx"
        pruned = prune(model, p, verify=False)
        save(pruned, path)
        m = final_measure(src, path, args.final_rounds, "auto")
        r = {
            "target": target,
            "allocator": label or allocator,
            "measured": m,
            "predicted": bound.predict(p.removed),
            "mac_ratio": cost.ratios(p.removed)[1],
            "kept_importance": kept_importance(an, scores, frozen, p.removed, criterion),
            "widths": [int(len(g.units) - p.removed[g.units].sum()) for g in an.groups],
            "round_to": None if allocator == "latency" else p.options.get("round_to"),
        }
        if args.wall and wall:
            r["measured_wall"] = final_measure(src, path, max(5, args.final_rounds // 2), "wall")
        if loop is not None:
            r["loop"] = loop
        if trained:
            r["top1_no_repair"] = evaluate(pruned, evalset)["top1"]
            if args.repair:
                t1 = time.time()
                work = repairs.get("lsq")(ridge=1e-3).apply(model, p, zero_removed(model, p), calib).model
                r["top1_lsq"] = evaluate(prune(work, p, verify=False), evalset)["top1"]
                r["lsq_seconds"] = round(time.time() - t1, 1)
        print(
            f"{name} t={target} {r['allocator']:18s} measured {m['ratio']:.3f} (pred {r['predicted']:.3f}) "
            f"macs {r['mac_ratio']:.3f} kept {r['kept_importance']:.3f} "
            + (f"top1 {r.get('top1_no_repair', 0):.4f}/{r.get('top1_lsq', 0):.4f}" if trained else ""),
            file=sys.stderr,
            flush=True,
        )
        return r

    def curve(target: float, allocator: str, matched: dict, goal: float) -> dict:
        """Top-1 after repair of ``allocator`` at a few MAC targets around the latency-matched plan, each measured;
        a least-squares line through (measured latency ratio, top-1) read at ``goal``: the closed loop lands the
        ratio allocators only within a few percent of the knapsack's latency, and a tiny model's measurements
        scatter by as much, so one point is not an equal-latency comparison."""
        import numpy as np

        points = [matched]
        for f in CURVE:
            q, _ = aligned(allocator, Target("macs", min(matched["mac_ratio"] * f, 0.99)))
            points.append(row(target, allocator, q, None, label=f"{allocator} curve", wall=False))
        x = np.array([r["measured"]["ratio"] for r in points])
        y = np.array([r["top1_lsq"] for r in points])
        slope, icpt = np.polyfit(x, y, 1)
        return {
            "target": target,
            "allocator": allocator,
            "at_latency": goal,
            "top1_lsq": float(slope * goal + icpt),
            "inside": bool(x.min() <= goal <= x.max()),
            "points": [
                {"mac_ratio": r["mac_ratio"], "measured": r["measured"]["ratio"], "top1_lsq": r["top1_lsq"]}
                for r in points
            ],
        }

    doc["unreachable"] = []
    doc["curves"] = []
    for target in args.targets:
        try:
            p, loop = reach("latency", target)
        except CarveError as e:  # e.g. ResNet-56 at 0.5: record it and go on, not lose the model's other rows
            doc["unreachable"].append({"target": target, "reason": str(e)})
            print(f"{name} t={target}: unreachable: {e}", file=sys.stderr, flush=True)
            continue
        lat = row(target, "latency", p, loop)
        doc["rows"].append(lat)
        goal = lat["measured"]["ratio"]  # the others aim at what the knapsack's model measured
        for allocator in ALLOCATORS:
            q, qloop = reach(allocator, goal)
            doc["rows"].append(row(target, allocator, q, qloop))
            if trained and args.repair:  # the ratio allocator's accuracy at exactly the knapsack's measured latency
                doc["curves"].append(curve(target, allocator, doc["rows"][-1], goal))
        for allocator in EQUAL_MACS:  # the same MACs as the latency-aware model, spread by MACs instead
            q, _ = aligned(allocator, Target("macs", lat["mac_ratio"]))
            doc["rows"].append(row(target, allocator, q, None, label=f"{allocator} equal MACs"))
    doc["load_after"] = load_avg()
    doc["alignment"] = []
    macs = ALIGN_TARGET.get(name, 0.5)
    for rt in (8, 16) if alignment else ():
        p = plan(an, Target("macs", macs), scores="l1", widths=Widths(round_to=rt))
        path = tmp / f"{name}_rt{rt}.onnx"
        save(prune(model, p, verify=False), path)
        m = final_measure(src, path, args.final_rounds, "auto")
        doc["alignment"].append({"round_to": rt, "mac_target": macs, "mac_ratio": cost.ratios(p.removed)[1], **m})
        print(f"{name} alignment round-to {rt}: {m['speedup']:.2f}x", file=sys.stderr, flush=True)
    return doc


def markdown(doc: dict) -> str:
    has_top1 = any("top1_lsq" in r for m in doc["models"] for r in m["rows"])

    def top1(by: dict, keys: list[str]) -> str:
        return " / ".join(f"{by[a]['top1_lsq']:.1%}" for a in keys if a in by and "top1_lsq" in by[a]) or "-"

    def per_target(m: dict):
        for t in sorted({r["target"] for r in m["rows"]}, reverse=True):
            yield t, {r["allocator"]: r for r in m["rows"] if r["target"] == t}

    head = [
        "model",
        "table: profiling, error",
        "target",
        "latency-aware: measured (predicted)",
        "MAC ratio",
        "kept importance: latency / uniform / global",
        "uniform, global: measured",
    ]
    if has_top1:
        head.append("top-1 after lsq: latency / uniform / global (at the same latency, fitted)")
    runs = Counter(m["model"] for m in doc["models"])
    rows = []
    for m in doc["models"]:
        fits = {(c["target"], c["allocator"]): c for c in m.get("curves", [])}
        for t, by in per_target(m):
            lat = by["latency"]
            within = abs(lat["measured"]["ratio"] / t - 1) <= 0.10
            cells = [
                f"{m['model']} ({m['input']})" + (f" #{m['repeat']}" if runs[m["model"]] > 1 else ""),
                f"{m['profile']['seconds_here']:.0f} s, {m['stated_error']:.0%}",
                f"{t:g}",
                f"{lat['measured']['ratio']:.3f} ({lat['predicted']:.3f}){'' if within else ' *'}",
                f"{lat['mac_ratio']:.3f}",
                " / ".join(f"{by[a]['kept_importance']:.3f}" for a in ["latency", *ALLOCATORS] if a in by),
                ", ".join(f"{by[a]['measured']['ratio']:.3f}" for a in ALLOCATORS if a in by),
            ]
            if has_top1:
                cell = top1(by, ["latency", *ALLOCATORS])
                fitted = [fits[(t, a)] for a in ALLOCATORS if (t, a) in fits]
                if fitted and "top1_lsq" in lat:
                    marks = [f"{c['top1_lsq']:.1%}{'' if c['inside'] else ' (extrapolated)'}" for c in fitted]
                    cell = f"{lat['top1_lsq']:.1%} / " + " / ".join(marks)
                cells.append(cell)
            rows.append(cells)
    lines = table(head, rows)
    lines.append("")
    lines.append(
        "Measured = latency of the pruned model / the original's, median of interleaved rounds on ONNX Runtime CPU "
        "(1 thread, batch 1, the thread's CPU clock); * = outside +-10% of the target. Kept importance = the share "
        "of the importance the knapsack maximises (Taylor on ResNet-56, L1 on the random-weight models, both "
        "normalised per group and weighted by the layers each group passes through) the kept channels hold. "
        "Uniform and global (round-to 16) aim, through the same closed loop, at the latency the latency-aware model "
        "measured. Their top-1 (ResNet-56) is read at exactly that latency from a least-squares line through five "
        "of their models around it (the loop-matched one and MAC targets x0.8-1.25 of it), each measured and "
        "repaired: a tiny model's latency measurements scatter by a few percent, and so does where the loop lands."
    )
    lines.append("")
    head = ["model", "target", "MAC ratio", "uniform: measured, kept", "knapsack (MACs): measured, kept"]
    if has_top1:
        head.append("top-1 after lsq: uniform / knapsack (MACs) / latency-aware")
    rows = []
    for m in doc["models"]:
        for t, by in per_target(m):
            eq = [by.get(f"{a} equal MACs") for a in EQUAL_MACS]
            if not all(eq):
                continue
            label = m["model"] + (f" #{m['repeat']}" if runs[m["model"]] > 1 else "")
            cells = [label, f"{t:g}", f"{by['latency']['mac_ratio']:.3f}"]
            cells += [f"{r['measured']['ratio']:.3f}, {r['kept_importance']:.3f}" for r in eq]
            if has_top1:
                cells.append(top1(by, [f"{a} equal MACs" for a in EQUAL_MACS] + ["latency"]))
            rows.append(cells)
    if rows:
        lines += table(head, rows)
        lines.append("")
        lines.append(
            "At the latency-aware model's MAC ratio: uniform allocation against the knapsack with MACs as its cost "
            "(`--allocate knapsack --target-macs`); measured = latency ratio as above."
        )
        lines.append("")
    head = ["model", "MAC target", "round-to 8: speed-up (95% CI)", "round-to 16: speed-up (95% CI)"]
    rows = []
    for m in doc["models"]:
        al = {a["round_to"]: a for a in m.get("alignment", [])}
        if 8 in al and 16 in al:
            rows.append(
                [m["model"], f"{al[8]['mac_target']:g}"]
                + [f"{al[k]['speedup']:.2f}x ({al[k]['ci'][0]:.2f}-{al[k]['ci'][1]:.2f})" for k in (8, 16)]
            )
    lines += table(head, rows)
    lines.append("")
    lines.append(f"GPU: {doc.get('gpu', 'not measured')}")
    return "\n".join(lines) + "\n"


def order(m: dict) -> tuple[int, int]:
    return (MODELS.index(m["model"]) if m["model"] in MODELS else 99, m.get("repeat", 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--loop-rounds", type=int, default=10, help="rounds of the closed loop's quick A/B")
    ap.add_argument("--final-rounds", type=int, default=15)
    ap.add_argument("--no-repair", dest="repair", action="store_false")
    ap.add_argument("--no-wall", dest="wall", action="store_false")
    ap.add_argument("--cached-tables", dest="fresh_tables", action="store_false", help="reuse cached tables")
    ap.add_argument("--resume", action="store_true", help="keep the models already in --output")
    ap.add_argument(
        "--repeats", type=int, default=1, help="run each model N times, each with a fresh table (rows per repeat)"
    )
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "latency.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    import json

    import torch

    gpu = "not lent: no NVIDIA GPU on the machine this ran on, so no torch-cuda / TensorRT row"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} present but not benchmarked by this run"
    docs = []
    out = Path(args.output)
    if args.resume and out.is_file():
        docs = [m for m in json.loads(out.read_text())["models"] if m["model"] in args.models]
    done = {m["model"] for m in docs}
    with tempfile.TemporaryDirectory(prefix="carve-bench-latency-") as tmp:
        for name, repeat in [(n, k) for n in args.models for k in range(1, args.repeats + 1)]:
            if name in done:
                continue
            docs.append({**bench_model(name, args, Path(tmp), alignment=repeat == 1), "repeat": repeat})
            doc = document(
                "latency",
                t0,
                backend="ort",
                device="cpu",
                threads=1,
                batch=1,
                targets=args.targets,
                gpu=gpu,
                method="tables profiled fresh; closed loop of carve prune --target-latency (quick A/B of "
                f"{args.loop_rounds} rounds); final measurement {args.final_rounds} interleaved rounds of >= 50 ms "
                "per model",
                models=sorted(docs, key=order),
            )
            write(doc, args.output, markdown, False)  # after every model: a long run keeps what it measured
    if args.markdown:
        print(markdown(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
