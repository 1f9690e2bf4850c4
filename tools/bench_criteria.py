"""Benchmark the importance criteria on real data, without fine-tuning or reconstruction.

CIFAR ResNet-56 with its trained weights (../shared/models/cifar10), calibration on ``train_subset.npz``, evaluation
on ``test.npz`` (JPEG-compressed copies of CIFAR-10: the unpruned model scores about 83% there; every number is
against the same model on the same data). Each criterion scores the model once (timed); each MAC target is then
reached by the allocator's bisection, pruned, and measured: top-1, top-1 agreement with the original, params, MACs,
and ONNX Runtime CPU latency against the original (batch 1, one thread, interleaved).

A second table covers CEP's own setting: LeNet-5 on scikit-learn's digits (structured criteria at the same MAC
targets, and unstructured sparsity with CEP against magnitude, including the paper's 16% of weights kept).

    python tools/bench_criteria.py                  # -> benchmarks/criteria.json
    python tools/bench_criteria.py --markdown
    python tools/bench_criteria.py --criteria l1 cep --targets 0.5 --eval-samples 2000   # quicker
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

CRITERIA = [
    ("random", {}, "uniform"),
    ("l1", {}, "uniform"),
    ("l2", {}, "uniform"),
    ("fpgm", {}, "uniform"),
    ("slimming", {}, "uniform"),
    ("hrank", {}, "uniform"),
    ("taylor", {}, "uniform"),
    ("cep", {}, "uniform"),
    ("cep", {"variant": "fisher"}, "uniform"),
    ("apbm", {}, "uniform"),
    ("aura", {"variant": "entropy"}, "uniform"),
    ("aura", {}, "uniform"),
    ("simfp", {}, "uniform"),
    ("simfp", {}, "dispersion"),
    ("l1", {}, "global"),
]


def label(name: str, opts: dict, allocator: str) -> str:
    extra = ",".join(f"{k}={v}" for k, v in opts.items())
    return name + (f"[{extra}]" if extra else "") + ("" if allocator == "uniform" else f" +{allocator}")


def run_model(
    model_path: Path, calib, evalset, criteria, targets, tmp: Path, *, latency: bool, round_to: int = 1
) -> list[dict]:
    from carve import analyse, load, prune, save
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.pruning.planner import Widths, plan, score
    from carve.pipeline.pruning.targets import Target

    m = load(model_path)
    base = evaluate(m, evalset)
    c0 = model_cost(m)
    rows = [
        {
            "criterion": "original",
            "target": 1.0,
            "top1": base["top1"],
            "agreement": 1.0,
            "params": c0.params,
            "macs": c0.macs,
        }
    ]
    an = analyse(m)
    for name, opts, allocator in criteria:
        t0 = time.perf_counter()
        try:
            scores = score(an, name, calib=calib, options=opts)
        except Exception as exc:  # e.g. slimming on a model without BN: record why, keep going
            rows.append({"criterion": label(name, opts, allocator), "error": str(exc).splitlines()[0]})
            continue
        seconds = time.perf_counter() - t0
        for t in targets:
            p = plan(
                an,
                Target("macs", t),
                scores=scores,
                allocator=allocator,
                widths=Widths(round_to=round_to),
            )
            q = prune(m, p)
            path = tmp / f"{name}_{allocator}_{t}.onnx"
            save(q, path)
            ev = evaluate(q, evalset, reference=m)
            c = model_cost(q)
            row = {
                "criterion": label(name, opts, allocator),
                "target": t,
                "top1": ev["top1"],
                "agreement": ev["reference"]["top1_agreement"],
                "kl": ev["reference"]["kl_mean"],
                "params": c.params,
                "macs": c.macs,
                "macs_ratio": c.macs / c0.macs,
                "score_seconds": seconds,
            }
            if latency:
                row["latency"] = speedups(model_path, path, [1], rounds=8)["1"]
            rows.append(row)
            print(
                f"{row['criterion']:28s} t={t}: top1 {row['top1']:.4f} agree {row['agreement']:.3f} "
                f"macs {row['macs_ratio']:.3f} score {seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def lenet_tables(tmp: Path, targets) -> dict:
    from carve import models
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load
    from carve.pipeline.measure.evaluate import evaluate
    from carve.plugins.passes.sparsify import sparsify

    path = tmp / "lenet5.onnx"
    models.export("lenet5", path)
    m = load(path)
    calib = load_data("digits:train", model=m, samples=512)
    test = load_data("digits:test", model=m)
    crits = [
        ("random", {}, "uniform"),
        ("l1", {}, "uniform"),
        ("taylor", {}, "uniform"),
        ("cep", {}, "uniform"),
        ("cep", {"variant": "fisher"}, "uniform"),
        ("cep", {"hcep": 0.1}, "uniform"),
    ]
    structured = run_model(path, calib, test, crits, targets, tmp, latency=False)
    unstructured = []
    for sparsity in (0.5, 0.7, 0.84):
        for crit, hcep in (("magnitude", 0.0), ("cep", 0.0), ("cep", 0.1)):
            res = sparsify(m, sparsity=sparsity, criterion=crit, hcep=hcep, data=calib)
            unstructured.append(
                {
                    "criterion": crit + (f"[hcep={hcep}]" if hcep else ""),
                    "target": sparsity,
                    "sparsity": res.sparsity,
                    "top1": evaluate(res.model, test)["top1"],
                }
            )
            print(f"lenet sparsify {crit} {sparsity}: {unstructured[-1]['top1']:.4f}", file=sys.stderr, flush=True)
    return {"structured": structured, "unstructured": unstructured}


def main() -> None:
    from carve import models
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import missing_reason, shared_file
    from carve.pipeline.graph import load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--criteria", nargs="*", help="names to keep (default: all)")
    ap.add_argument("--targets", nargs="*", type=float, default=[0.75, 0.5, 0.35])
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--eval-samples", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--round-to", type=int, default=8, help="channel alignment of the ResNet-56 plans (default 8)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-lenet", action="store_true")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "criteria.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    train, test = shared_file("data", "cifar10", "train_subset.npz"), shared_file("data", "cifar10", "test.npz")
    if not models.has_trained_weights(args.model) or train is None or test is None:
        sys.exit(f"bench_criteria needs the shared CIFAR data and weights: {missing_reason('data', 'cifar10')}")
    crits = [c for c in CRITERIA if not args.criteria or c[0] in args.criteria]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / f"{args.model}.onnx"
        models.export(args.model, path)
        m = load(path)
        calib = load_data(train, model=m, samples=args.calib_samples, seed=0)
        evalset = load_data(test, model=m, samples=args.eval_samples, seed=1)
        rows = run_model(
            path, calib, evalset, crits, args.targets, tmp, latency=not args.no_latency, round_to=args.round_to
        )
        lenet = None if args.no_lenet else lenet_tables(tmp, args.targets)
    doc = document(
        "criteria",
        t0,
        model=args.model,
        calibration={"source": "train_subset.npz", "samples": args.calib_samples},
        round_to=args.round_to,
        evaluation={"source": "test.npz", "samples": len(evalset)},
        notes="no fine-tuning, no reconstruction; uniform allocator unless marked; channels kept in multiples of "
        f"{args.round_to}; latency: ORT CPU, batch 1, "
        "1 thread, speed-up against the original (median of interleaved rounds, 95% CI)",
        rows=rows,
        lenet5_digits=lenet,
    )
    write(doc, args.output, markdown, args.markdown)


def markdown(doc: dict) -> str:
    targets = sorted({r["target"] for r in doc["rows"] if r.get("target", 1.0) < 1.0}, reverse=True)
    orig = next(r for r in doc["rows"] if r["criterion"] == "original")
    rows = []
    for name in dict.fromkeys(r["criterion"] for r in doc["rows"] if r["criterion"] != "original"):
        rs = [r for r in doc["rows"] if r["criterion"] == name]
        if "error" in rs[0]:
            rows.append([name, "-"] + ["n/a: " + rs[0]["error"][:60]] * len(targets))
            continue
        cells = []
        for t in targets:
            r = next((r for r in rs if r["target"] == t), None)
            lat = f" / {r['latency']['speedup']:.2f}x" if r is not None and "latency" in r else ""
            cells.append("-" if r is None else f"{r['top1']:.1%} / {r['agreement']:.1%}{lat}")
        rows.append([name, f"{rs[0]['score_seconds']:.1f} s", *cells])
    lines = [
        f"{doc['model']}: original top-1 {orig['top1']:.2%} on {doc['evaluation']['samples']} test images, "
        f"{orig['params']:,} params, {orig['macs']:,} MACs",
        "",
        *table(["criterion", "scoring"] + [f"MACs {t:g}: top-1 / agree / speed-up" for t in targets], rows),
    ]
    if doc.get("lenet5_digits"):
        ln = doc["lenet5_digits"]
        o = next(r for r in ln["structured"] if r["criterion"] == "original")
        structured = []
        for name in dict.fromkeys(r["criterion"] for r in ln["structured"] if r["criterion"] != "original"):
            rs = {r["target"]: r for r in ln["structured"] if r["criterion"] == name}
            structured.append([name] + [f"{rs[t]['top1']:.1%}" if t in rs else "-" for t in targets])
        sp = sorted({r["target"] for r in ln["unstructured"]})
        unstructured = []
        for name in dict.fromkeys(r["criterion"] for r in ln["unstructured"]):
            rs = {r["target"]: r for r in ln["unstructured"] if r["criterion"] == name}
            unstructured.append(
                [name] + [f"{rs[s]['top1']:.1%} ({rs[s]['sparsity']:.0%} zero)" if s in rs else "-" for s in sp]
            )
        lines += [
            "",
            f"LeNet-5 on digits (original top-1 {o['top1']:.2%}): structured pruning, no fine-tuning",
            "",
            *table(["criterion"] + [f"MACs {t:g}" for t in targets], structured),
            "",
            "LeNet-5 on digits: unstructured sparsity (weights zeroed, no speed-up claimed)",
            "",
            *table(["criterion"] + [f"target {s:.0%} zero" for s in sp], unstructured),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
