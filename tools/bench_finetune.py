"""Benchmark fine-tuning: CIFAR ResNet-56 (trained weights) pruned with L1 and Taylor to 1.5x, 2x and 3x fewer MACs,
then recovered by distillation fine-tuning on the 10,000-image train subset, one-shot (prune, then fine-tune) and
gradual (three prune + fine-tune rounds with the same number of epochs in all). Top-1 on all 10,000 test images of the
JPEG copy (the unpruned model: 83.20%), images/s, CPU and wall time; each run trains on one thread, ``--jobs`` runs at a
time. Rows are written as they finish; a rerun skips the rows already in the JSON (``--fresh`` to redo them).

    python tools/bench_finetune.py                       # -> benchmarks/finetune.json
    python tools/bench_finetune.py --criteria l1 --targets 0.5 --epochs 2 -o /tmp/ft.json   # a quick subset
    python tools/bench_finetune.py --markdown            # also print the README table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from benchio import document, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {0.667: "1.5x", 0.5: "2x", 0.333: "3x"}


def run_one(job: dict) -> dict:
    """One row: prune (one-shot or gradual) and fine-tune, evaluated on the test set. Runs in a worker process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.pruning.prune import PruneOptions, prune_model
    from carve.pipeline.training.finetune import FinetuneOptions, finetune
    from carve.plugins.passes.gradual import keep_schedule

    original = load(job["model"])
    train = load_data(job["train"], model=original, seed=0)
    calib = train.sample(256, seed=0) if job["criterion"] == "taylor" else None
    test = load_data(job["test"], model=original, seed=1)
    opts = {k: v for k, v in job["finetune"].items()}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    macs0 = model_cost(original).macs
    if job["mode"] == "one-shot":
        rounds = [(job["target"], job["epochs"])]
    else:
        keep = keep_schedule(job["target"], steps=job["rounds"])
        rounds = [(k, job["epochs"] / job["rounds"]) for k in keep]
    current, pruned_top1, images, train_cpu = original, None, 0, 0.0
    for keep, epochs in rounds:
        fraction = min(1.0, keep * macs0 / model_cost(current).macs)
        po = PruneOptions(criterion=job["criterion"], target_macs=fraction, round_to=8, seed=0)
        current = prune_model(current, po, calib=calib).model
        if pruned_top1 is None:
            pruned_top1 = evaluate(current, test)["top1"]  # after the first cut, before any fine-tuning
        t0 = time.process_time()
        result = finetune(current, train, FinetuneOptions(epochs=epochs, **opts), teacher=original)
        train_cpu += time.process_time() - t0
        current, images = result.model, images + result.summary["images"]
    cost = model_cost(current)
    return {
        **{k: job[k] for k in ("criterion", "target", "mode", "epochs")},
        "rounds": len(rounds),
        "macs_ratio": cost.macs / macs0,
        "params": cost.params,
        "top1_pruned": pruned_top1,
        "top1": evaluate(current, test)["top1"],
        "cpu_min": round((time.process_time() - cpu0) / 60, 2),
        "train_cpu_min": round(train_cpu / 60, 2),
        "wall_min": round((time.perf_counter() - wall0) / 60, 2),
        "images_per_s": round(images / train_cpu, 1) if train_cpu else None,
    }


def main() -> None:
    from carve import models
    from carve.pipeline.data.shared import missing_reason, shared_file
    from carve.pipeline.graph import load
    from carve.pipeline.measure.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criteria", nargs="*", default=["l1", "taylor"])
    ap.add_argument("--targets", nargs="*", type=float, default=list(TARGETS))
    ap.add_argument("--modes", nargs="*", default=["one-shot", "gradual"])
    ap.add_argument("--epochs", type=float, default=6, help="fine-tuning epochs in all (gradual: split over rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="gradual: prune + fine-tune rounds")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the finetune default)")
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--fresh", action="store_true", help="redo rows already in the output")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "finetune.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    train, test = shared_file("data", "cifar10", "train_subset.npz"), shared_file("data", "cifar10", "test.npz")
    if train is None or test is None or not models.has_trained_weights("resnet56"):
        sys.exit("bench_finetune needs the CIFAR data and ResNet-56 weights: " + missing_reason("data", "cifar10"))
    out = Path(args.output)
    old = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    rows = list(old.get("rows", []))
    done = {(r["criterion"], r["target"], r["mode"]) for r in rows}
    finetune_opts = {k: v for k, v in (("lr", args.lr), ("optimizer", args.optimizer)) if v is not None}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "resnet56.onnx"
        models.export("resnet56", model)
        base = old.get("original") or {"top1": evaluate(load(model), _test(test, model))["top1"]}
        jobs = [
            {
                "model": str(model),
                "train": str(train),
                "test": str(test),
                "criterion": c,
                "target": t,
                "mode": m,
                "epochs": args.epochs,
                "rounds": args.rounds,
                "finetune": finetune_opts,
            }
            for c in args.criteria
            for t in args.targets
            for m in args.modes
            if (c, t, m) not in done
        ]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, j): j for j in jobs}
            for f in as_completed(futures):
                row = f.result()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                doc = _doc(started, base, rows, args, old)
                write(doc, out, markdown, False)
    write(_doc(started, base, rows, args, old), out, markdown, args.markdown)


def _test(path, model_path):
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load

    return load_data(path, model=load(model_path), seed=1)


def _doc(started: float, base: dict, rows: list, args, old: dict) -> dict:
    keys = [(c, t, m) for c in ("l1", "taylor") for t in TARGETS for m in ("one-shot", "gradual")]
    rows = sorted(rows, key=lambda r: keys.index(k) if (k := (r["criterion"], r["target"], r["mode"])) in keys else 99)
    return document(
        "finetune",
        started - (old.get("seconds") or 0),
        model="resnet56 (CIFAR-10, trained weights)",
        original=base,
        data={"train": "train_subset.npz (10,000 images)", "test": "test.npz (all 10,000 images)"},
        method=f"prune (L1 or Taylor on 256 training images, uniform, round-to 8) to the MAC target, then "
        f"distillation fine-tuning from the unpruned model ({args.epochs:g} epochs in all; gradual: "
        f"{args.rounds} prune + fine-tune rounds, geometric MAC schedule); one torch thread per run, "
        f"{args.jobs} runs at a time; load average before: {os.getloadavg()[0]:.1f}",
        rows=rows,
    )


def markdown(doc: dict) -> str:
    base = doc["original"]["top1"]
    rows = [
        [
            r["criterion"],
            TARGETS.get(r["target"], f"{r['target']:g}"),
            f"{r['macs_ratio']:.1%}",
            r["mode"] + (f" ({r['rounds']} rounds)" if r["mode"] == "gradual" else ""),
            f"{r['epochs']:g}",
            f"{r['top1_pruned']:.2%}",
            f"**{r['top1']:.2%}** ({(r['top1'] - base) * 100:+.2f})",
            f"{r['train_cpu_min']:.1f} / {r['wall_min']:.1f}",
            f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-",
        ]
        for r in doc["rows"]
    ]
    header = [
        "criterion",
        "fewer MACs",
        "MACs kept",
        "schedule",
        "epochs",
        "top-1 pruned",
        "top-1 fine-tuned (vs original)",
        "train CPU / wall min",
        "images/s (1 thread)",
    ]
    head = f"ResNet-56 on CIFAR-10 (JPEG copy), original top-1 {base:.2%} on all 10,000 test images"
    return "\n".join([head, "", *table(header, rows)])


if __name__ == "__main__":
    main()
