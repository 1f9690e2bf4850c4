"""Benchmark how allocators spread a MAC budget over ResNet-56's groups (CIFAR-10, trained weights): uniform, global
and the knapsack under MACs (``--allocate knapsack --target-macs``) with its importance scales, per criterion.

The question (issue 13, point 3): a knapsack compares groups on one importance scale; which scale keeps the
channels that matter, such as the residual stream that every block of a stage reads and writes? For L1, Taylor and
CEP, at 60%, 50%, 40% and 25% of the MACs (round-to 8): top-1 on 2,000 test images without repair and after the
least-squares repair (``--fuse lsq``, 256 calibration images), and the stream's kept width.

    python tools/bench_allocation.py                 # -> benchmarks/allocation.json (about 30 minutes)
    python tools/bench_allocation.py --markdown
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchio import document, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, allocator, allocator options)
SETUPS = [
    ("uniform", "uniform", {}),
    ("global (mean)", "global", {}),
    ("global (layers)", "global", {"norm": "layers"}),
    ("knapsack (layers, default)", "knapsack", {}),
    ("knapsack (mean)", "knapsack", {"norm": "mean"}),
    ("knapsack (none)", "knapsack", {"norm": "none"}),
]


def run(args) -> dict:
    from carve import analyse, load, models, prune
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import shared_file
    from carve.pipeline.graph.cost import CostModel
    from carve.pipeline.graph.rewrite import ensure_biases
    from carve.pipeline.graph.surgery import zero_removed
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.pruning.allocator import allocators
    from carve.pipeline.pruning.planner import Widths, plan, score
    from carve.pipeline.pruning.repair import repairs
    from carve.pipeline.pruning.targets import Target
    from carve.plugins.allocators.global_rank import layer_counts

    with tempfile.TemporaryDirectory(prefix="carve-bench-allocation-") as tmp:
        src = Path(tmp) / "resnet56.onnx"
        models.export("resnet56", src)
        model = load(src)
    ensure_biases(model)  # the least-squares refit's intercept
    an = analyse(model)
    calib = load_data(shared_file("data", "cifar10", "train_subset.npz"), model=model, samples=256, seed=0)
    evalset = load_data(shared_file("data", "cifar10", "test.npz"), model=model, samples=args.eval_samples, seed=1)
    cost = CostModel(an)
    counts = layer_counts(an)
    stream = max(an.groups, key=lambda g: counts[g.id])
    rows = []
    for criterion in args.criteria:
        scores = score(an, criterion, calib=calib)
        for macs in args.macs:
            for label, allocator, opts in SETUPS:
                alloc = allocators.get(allocator)(**opts)
                p = plan(an, Target("macs", macs), scores=scores, allocator=alloc, widths=Widths(round_to=8))
                work = repairs.get("lsq")(ridge=1e-3).apply(model, p, zero_removed(model, p), calib).model
                r = {
                    "criterion": criterion,
                    "target_macs": macs,
                    "setup": label,
                    "allocator": allocator,
                    "options": opts,
                    "mac_ratio": cost.ratios(p.removed)[1],
                    "stream_width": [len(sl) - int(p.removed[sl].sum()) for sl in stream.slices],
                    "widths": [int(len(g.units) - p.removed[g.units].sum()) for g in an.groups],
                    "top1_no_repair": evaluate(prune(model, p, verify=False), evalset)["top1"],
                    "top1_lsq": evaluate(prune(work, p, verify=False), evalset)["top1"],
                }
                rows.append(r)
                print(
                    f"{criterion} {macs} {label:26s} macs {r['mac_ratio']:.3f} stream {r['stream_width']} "
                    f"top1 {r['top1_no_repair']:.4f} / lsq {r['top1_lsq']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
    return {
        "model": "resnet56",
        "original_top1": evaluate(model, evalset)["top1"],
        "eval_samples": args.eval_samples,
        "stream": {"group": stream.id, "slices": [len(sl) for sl in stream.slices], "layers": int(counts[stream.id])},
        "rows": rows,
    }


def markdown(doc: dict) -> str:
    setups = [s[0] for s in SETUPS]
    crits = list(dict.fromkeys(r["criterion"] for r in doc["rows"]))
    head = ["criterion", "MACs", *setups]
    rows = []
    for c in crits:
        for macs in sorted({r["target_macs"] for r in doc["rows"]}, reverse=True):
            by = {r["setup"]: r for r in doc["rows"] if r["criterion"] == c and r["target_macs"] == macs}
            cells = [c, f"{macs:g}"]
            for s in setups:
                r = by.get(s)
                cells.append(f"{r['top1_lsq']:.1%} ({sum(r['stream_width'])})" if r else "-")
            rows.append(cells)
    lines = table(head, rows)
    lines.append("")
    lines.append(
        f"ResNet-56 (CIFAR-10, {doc['original_top1']:.1%} on these {doc['eval_samples']:,} test images): top-1 after "
        f"the least-squares repair, and in brackets the residual stream's kept width (of "
        f"{sum(doc['stream']['slices'])}: {doc['stream']['layers']} layers read or write it). Round-to 8. Knapsack "
        "scales: mean = scores / their group's mean (global's default); layers = that times the layers the group "
        "passes through (the knapsack's default); none = raw scores."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criteria", nargs="*", default=["l1", "taylor", "cep"])
    ap.add_argument("--macs", nargs="*", type=float, default=[0.6, 0.5, 0.4, 0.25])
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "allocation.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    if args.markdown and Path(args.output).is_file():
        import json

        print(markdown(json.loads(Path(args.output).read_text())))
        return
    doc = document("allocation", t0, round_to=8, repair="lsq (ridge 1e-3, 256 calibration images)", **run(args))
    write(doc, args.output, markdown, True)


if __name__ == "__main__":
    main()
