"""Benchmark decomposition, merging, fusion and least-squares repair against plain pruning, at equal MAC targets.

ResNet-56 on CIFAR-10 (trained weights and data from ../shared): for MAC targets 0.75, 0.5, 0.35 —
``decompose`` (data-aware SVD, ranks by bisection to the target), ``decompose+merge`` (pairs merged back where they
run slower on ORT CPU), ``prune`` (L1, uniform, round-to 8), ``prune+fuse`` (exact fusion of positive multiples) and
``prune+lsq`` (least-squares refit of the consumers on 256 calibration images): MACs, params, top-1 on the test set,
and ONNX Runtime CPU latency against the original at batch 1 and 8 (one thread, interleaved, speed-up with 95% CI).

ResNet-18, ResNet-50 and VGG-16-BN with random weights measure latency only (fusion and lsq change weights, not the
structure: their latency is plain pruning's).

    python tools/bench_decompose.py                  # -> benchmarks/decompose.json
    python tools/bench_decompose.py --markdown
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchio import document, speedups, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def variants(m, target: float, calib, *, with_data: bool):
    """(name, model) for every variant at one MAC target."""
    from carve.pipeline.passes import PassContext, build
    from carve.pipeline.pruning.prune import PruneOptions, prune_model

    ctx = PassContext(calib=calib if with_data else None)
    d = build("decompose", target_macs=target, round_to=8 if target > 0.4 else 4)(m, ctx).model
    yield "decompose", d
    yield "decompose+merge", build("merge", when="slower")(d, ctx).model
    opts = dict(criterion="l1", target_macs=target, round_to=8, verify=False)
    yield "prune", prune_model(m, PruneOptions(**opts)).model
    if with_data:
        yield "prune+fuse", prune_model(m, PruneOptions(**opts, repairs=["exact"])).model
        yield "prune+lsq", prune_model(m, PruneOptions(**opts, repairs=["lsq"]), calib=calib).model


def main() -> None:
    from carve import models
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import shared_file
    from carve.pipeline.graph import load, save
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.measure.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", type=float, default=[0.75, 0.5, 0.35])
    ap.add_argument("--latency-models", nargs="*", default=["resnet18", "resnet50", "vgg16_bn"])
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "decompose.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    train, test = shared_file("data", "cifar10", "train_subset.npz"), shared_file("data", "cifar10", "test.npz")
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        todo = []
        if train is not None and test is not None and models.has_trained_weights("resnet56"):
            todo.append(("resnet56", True))
        else:
            print("no shared CIFAR data/weights: ResNet-56 accuracy rows skipped", file=sys.stderr)
        todo += [(name, False) for name in args.latency_models]
        for name, with_data in todo:
            src = tmp / f"{name}.onnx"
            models.export(name, src)
            m = load(src)
            c0 = model_cost(m)
            calib = evalset = None
            if with_data:
                calib = load_data(train, model=m, samples=args.calib_samples, seed=0)
                evalset = load_data(test, model=m, samples=args.eval_samples, seed=1)
                rows.append(
                    {
                        "model": name,
                        "variant": "original",
                        "target": 1.0,
                        "macs": c0.macs,
                        "params": c0.params,
                        "top1": evaluate(m, evalset)["top1"],
                    }
                )
            for target in args.targets:
                for variant, q in variants(m, target, calib, with_data=with_data):
                    path = tmp / f"{name}_{variant}_{target}.onnx"
                    save(q, path)
                    c = model_cost(q)
                    row = {
                        "model": name,
                        "variant": variant,
                        "target": target,
                        "macs": c.macs,
                        "params": c.params,
                        "macs_ratio": c.macs / c0.macs,
                        "params_ratio": c.params / c0.params,
                        "latency": speedups(src, path, [1, 8], args.rounds),
                    }
                    if evalset is not None:
                        ev = evaluate(q, evalset, reference=m)
                        row.update(top1=ev["top1"], agreement=ev["reference"]["top1_agreement"])
                    rows.append(row)
                    acc = f" top1 {row['top1']:.4f}" if "top1" in row else ""
                    print(
                        f"{name:9s} {variant:16s} t={target}: macs {row['macs_ratio']:.3f}{acc} "
                        f"b1 {row['latency']['1']['speedup']:.2f}x b8 {row['latency']['8']['speedup']:.2f}x",
                        file=sys.stderr,
                        flush=True,
                    )
    doc = document(
        "decompose",
        t0,
        notes="no fine-tuning; decompose: data-aware SVD for ResNet-56 (plain SVD for the random-weight models), "
        "ranks bisected to the MAC target; prune: L1 uniform, round-to 8; lsq: 256 calibration images; "
        "latency: ORT CPU, 1 thread, speed-up vs the original (median of interleaved rounds, 95% CI)",
        rows=rows,
    )
    write(doc, args.output, markdown, args.markdown)


def markdown(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        if r["variant"] == "original":
            cost = [f"{r['macs']:,}", f"{r['params']:,}", f"{r['top1']:.2%}"]
            rows.append([r["model"], "original", 1, *cost, "-", "-", "-"])
            continue
        b1, b8 = r["latency"]["1"], r["latency"]["8"]
        rows.append(
            [
                r["model"],
                r["variant"],
                f"{r['target']:g}",
                f"{r['macs_ratio']:.1%}",
                f"{r['params_ratio']:.1%}",
                f"{r['top1']:.2%}" if "top1" in r else "-",
                f"{r['agreement']:.2%}" if "agreement" in r else "-",
                f"{b1['speedup']:.2f}x",
                f"{b8['speedup']:.2f}x",
            ]
        )
    header = ["model", "variant", "MAC target", "MACs", "params", "top-1", "agreement", "speed-up b1", "speed-up b8"]
    return "\n".join(table(header, rows) + recovery(doc))


def recovery(doc: dict) -> list[str]:
    """What fusion and lsq recover against plain pruning at the same MAC target (accuracy rows only)."""
    acc = {(r["model"], r["variant"], r["target"]): r["top1"] for r in doc["rows"] if "top1" in r}
    cases = sorted({(m, t) for m, v, t in acc if v == "prune"}, key=lambda c: (c[0], -c[1]))
    if not cases:
        return []
    rows = []
    for model, t in cases:
        base = acc[(model, "prune", t)]
        cells = []
        for variant in ("prune+fuse", "prune+lsq", "decompose"):
            v = acc.get((model, variant, t))
            if v is None:
                cells.append("-")
            elif variant == "decompose":
                cells.append(f"{v:.2%}")
            else:
                cells.append(f"{v:.2%} ({(v - base) * 100:+.1f} pts)")
        rows.append([model, f"{t:g}", f"{base:.2%}", *cells])
    header = ["model", "MAC target", "prune", "prune+fuse (recovered)", "prune+lsq (recovered)", "decompose"]
    return ["", *table(header, rows)]


if __name__ == "__main__":
    main()
