"""Benchmark fine-tuning: CIFAR ResNet-56 (and ResNet-20; trained weights) pruned with L1 and Taylor to 1.5x, 2x and
3x fewer MACs, then recovered by distillation fine-tuning on the 10,000-image train subset, one-shot (prune, then
fine-tune) and gradual (three prune + fine-tune rounds with the same number of epochs in all). Top-1 on all 10,000 test
images of the JPEG copy, images/s, CPU and wall time; each run trains on one thread, ``--jobs`` runs at a time. Rows
are written as they finish; a rerun skips the rows already in the JSON (``--fresh`` to redo them).

Two export paths (``--exports``): ``bn-kept``, the zoo's export (``carve export``: BatchNormalization stays a node), and
``folded``, ``torch.onnx.export`` of the model in eval mode (``TrainingMode.EVAL``, what a plain export does: every BN
folded into its conv), which fine-tuning trains with BN re-inserted (``--bn``, default auto).

    python tools/bench_finetune.py                       # -> benchmarks/finetune.json
    python tools/bench_finetune.py --criteria l1 --targets 0.5 --epochs 2 -o /tmp/ft.json   # a quick subset
    python tools/bench_finetune.py --markdown            # also print the README table
    python tools/bench_finetune.py --models resnet56 resnet20 --exports bn-kept folded --criteria l1 \
        --targets 0.667 0.5 --modes one-shot --epochs 3           # the export-path rows (issue 26)
    python tools/bench_finetune.py --models resnet20 resnet56 --exports folded bn-kept --criteria energy \
        --targets 0.5 0.667 --modes one-shot --epochs 3           # the same with the energy criterion

``energy`` and ``taylor`` score on 256 training images.
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
MODELS = ("resnet56", "resnet20")
EXPORTS = {"bn-kept": "zoo export, BN kept", "folded": "eval-mode torch.onnx.export, BN folded"}
MAIN = ("resnet56", "bn-kept")  # the headline grid
CRITERIA = ("l1", "taylor", "energy")  # row order; energy: the criterion that ranks both exports alike (issue 26)


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
    from carve.pipeline.pruning.criterion import criteria

    data = criteria.get(job["criterion"]).needs & {"activations", "gradients", "labels"}
    calib = train.sample(256, seed=0) if data else None  # taylor, energy: 256 training images
    test = load_data(job["test"], model=original, seed=1)
    opts = {k: v for k, v in job["finetune"].items()}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    macs0 = model_cost(original).macs
    if job["mode"] == "one-shot":
        rounds = [(job["target"], job["epochs"])]
    else:
        keep = keep_schedule(job["target"], steps=job["rounds"])
        rounds = [(k, job["epochs"] / job["rounds"]) for k in keep]
    current, pruned_top1, images, train_cpu, bn = original, None, 0, 0.0, None
    for keep, epochs in rounds:
        fraction = min(1.0, keep * macs0 / model_cost(current).macs)
        po = PruneOptions(criterion=job["criterion"], target_macs=fraction, round_to=8, seed=0)
        current = prune_model(current, po, calib=calib).model
        if pruned_top1 is None:
            pruned_top1 = evaluate(current, test)["top1"]  # after the first cut, before any fine-tuning
        t0 = time.process_time()
        result = finetune(current, train, FinetuneOptions(epochs=epochs, **opts), teacher=original)
        train_cpu += time.process_time() - t0
        current, images, bn = result.model, images + result.summary["images"], result.summary["bn"]
    cost = model_cost(current)
    return {
        **{k: job[k] for k in ("model_name", "export", "criterion", "target", "mode", "epochs")},
        **({"seed": job["seed"]} if job.get("seed") else {}),
        "bn": bn,
        "nodes": len(current.graph.node),
        "original_nodes": len(original.graph.node),
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
    ap.add_argument("--models", nargs="*", default=["resnet56"], choices=list(MODELS))
    ap.add_argument("--exports", nargs="*", default=["bn-kept"], choices=list(EXPORTS))
    ap.add_argument("--bn", default=None, help="fine-tuning's bn option (default: the finetune default, auto)")
    ap.add_argument("--criteria", nargs="*", default=["l1", "taylor"])
    ap.add_argument("--targets", nargs="*", type=float, default=list(TARGETS))
    ap.add_argument("--modes", nargs="*", default=["one-shot", "gradual"])
    ap.add_argument("--epochs", type=float, default=6, help="fine-tuning epochs in all (gradual: split over rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="gradual: prune + fine-tune rounds")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the finetune default)")
    ap.add_argument("--optimizer", default=None)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument(
        "--seeds", nargs="*", type=int, default=[0], help="fine-tuning seeds (rows per seed; the tables show seed 0)"
    )
    ap.add_argument("--fresh", action="store_true", help="redo rows already in the output")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "finetune.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    train, test = shared_file("data", "cifar10", "train_subset.npz"), shared_file("data", "cifar10", "test.npz")
    if train is None or test is None or not all(models.has_trained_weights(m) for m in args.models):
        sys.exit("bench_finetune needs the CIFAR data and ResNet weights: " + missing_reason("data", "cifar10"))
    out = Path(args.output)
    old = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    rows = [_keyed(r) for r in old.get("rows", [])]
    done = {_key(r) for r in rows}
    options = (("lr", args.lr), ("optimizer", args.optimizer), ("bn", args.bn))
    finetune_opts = {k: v for k, v in options if v is not None}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        originals = dict(old.get("originals") or {})
        if old.get("original") and "resnet56/bn-kept" not in originals:
            originals["resnet56/bn-kept"] = old["original"]
        paths = {}
        for name in args.models:
            for export in args.exports:
                path = paths[name, export] = Path(tmp) / f"{name}-{export}.onnx"
                models.export(name, path, fold_bn=export == "folded")
                g = load(path)
                originals.setdefault(
                    f"{name}/{export}",
                    {
                        "top1": evaluate(g, _test(test, path))["top1"],
                        "batchnorm": sum(n.op_type == "BatchNormalization" for n in g.graph.node),
                        "conv": sum(n.op_type == "Conv" for n in g.graph.node),
                    },
                )
        jobs = [
            {
                "model": str(paths[name, export]),
                "model_name": name,
                "export": export,
                "train": str(train),
                "test": str(test),
                "criterion": c,
                "target": t,
                "mode": m,
                "epochs": args.epochs,
                "rounds": args.rounds,
                "finetune": {**finetune_opts, **({"seed": seed} if seed else {})},
                "seed": seed,
            }
            for seed in args.seeds
            for name in args.models
            for export in args.exports
            for c in args.criteria
            for t in args.targets
            for m in args.modes
            if (name, export, c, t, m, seed) not in done
        ]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_one, j): j for j in jobs}
            for f in as_completed(futures):
                row = f.result()
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                doc = _doc(started, originals, rows, args, old)
                write(doc, out, markdown, False)
    write(_doc(started, originals, rows, args, old), out, markdown, args.markdown)


def _keyed(row: dict) -> dict:
    """Rows written before the export-path column were ResNet-56, BN kept."""
    return {"model_name": "resnet56", "export": "bn-kept", **row}


def _key(row: dict) -> tuple:
    return (row["model_name"], row["export"], row["criterion"], row["target"], row["mode"], row.get("seed", 0))


def _test(path, model_path):
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load

    return load_data(path, model=load(model_path), seed=1)


def _doc(started: float, originals: dict, rows: list, args, old: dict) -> dict:
    keys = [
        (n, e, c, t, m)
        for n in MODELS
        for e in EXPORTS
        for c in CRITERIA
        for t in TARGETS
        for m in ("one-shot", "gradual")
    ]
    rows = sorted(rows, key=lambda r: (keys.index(k[:5]) if (k := _key(r))[:5] in keys else 999, k[5]))
    return document(
        "finetune",
        started - (old.get("seconds") or 0),
        model="CIFAR-10 ResNet-56 / ResNet-20 (trained weights)",
        exports=EXPORTS,
        original=originals.get("resnet56/bn-kept"),
        originals=originals,
        data={"train": "train_subset.npz (10,000 images)", "test": "test.npz (all 10,000 images)"},
        method=f"prune (L1; Taylor or energy on 256 training images; uniform, round-to 8) to the MAC target, then "
        f"distillation fine-tuning from the unpruned model ({args.epochs:g} epochs in all; gradual: "
        f"{args.rounds} prune + fine-tune rounds, geometric MAC schedule); one torch thread per run, "
        f"{args.jobs} runs at a time; load average before: {os.getloadavg()[0]:.1f}",
        rows=rows,
    )


def markdown(doc: dict) -> str:
    """The README table: the ResNet-56 BN-kept grid, then the export-path rows (both exports of each model)."""
    originals = doc.get("originals") or {"resnet56/bn-kept": doc["original"]}
    seeds: dict[tuple, list[float]] = {}
    for r in doc["rows"]:
        seeds.setdefault(_key(_keyed(r))[:5], []).append(r["top1"])
    rows = [r for r in doc["rows"] if not r.get("seed")]  # the tables: seed 0; other seeds give the spread
    grid = [r for r in rows if (r.get("model_name", "resnet56"), r.get("export", "bn-kept")) == MAIN]
    grid = [r for r in grid if r["criterion"] in ("l1", "taylor")]
    paths = [r for r in rows if r.get("mode") == "one-shot" and r.get("criterion") in ("l1", "energy")]
    paths = [r for r in paths if r.get("target") in (0.5, 0.667)]
    out = [_grid(grid, originals["resnet56/bn-kept"]["top1"])]
    if any(r.get("export") == "folded" for r in paths):
        out += ["", _paths(paths, originals, seeds)]
    return "\n".join(out)


def _paths(rows: list, originals: dict, seeds: dict[tuple, list[float]]) -> str:
    """Both export paths side by side: per model, target and criterion, the top-1 after 3 epochs of defaults."""
    header = [
        "model",
        "criterion",
        "export",
        "BN nodes",
        "fewer MACs",
        "top-1 pruned",
        "top-1 fine-tuned (vs original)",
        "BN in training",
        "seeds: mean (min-max)",
    ]
    body = []
    order = {e: i for i, e in enumerate(EXPORTS)}
    key = lambda r: (MODELS.index(r["model_name"]), -r["target"], CRITERIA.index(r["criterion"]), order[r["export"]])  # noqa: E731
    for r in sorted(rows, key=key):
        base = originals.get(f"{r['model_name']}/{r['export']}", {})
        top = base.get("top1")
        vs = f" ({(r['top1'] - top) * 100:+.2f})" if top is not None else ""
        body.append(
            [
                r["model_name"] + (f" ({top:.2%})" if top is not None else ""),
                r["criterion"],
                EXPORTS[r["export"]],
                str(base.get("batchnorm", "-" if r["export"] == "folded" else "yes")),
                TARGETS.get(r["target"], f"{r['target']:g}"),
                f"{r['top1_pruned']:.2%}",
                f"**{r['top1']:.2%}**{vs}",
                _bn(r.get("bn")),
                _spread(seeds.get(_key(r)[:5], [])),
            ]
        )
    head = (
        "Export paths: L1 and energy, one-shot, 3 epochs of defaults, top-1 on all 10,000 test images (original in "
        "brackets)"
    )
    return "\n".join([head, "", *table(header, body)])


def _spread(top1: list[float]) -> str:
    """Top-1 over the fine-tuning seeds run for one configuration: their number, mean and range."""
    if len(top1) < 2:
        return "-"
    return f"{len(top1)}: {sum(top1) / len(top1):.2%} ({min(top1):.2%}-{max(top1):.2%})"


def _bn(bn: dict | None) -> str:
    if not bn:
        return "trained as batch norm"  # rows from before the column: the BN-kept graph
    if bn["inserted"]:
        return f"{bn['inserted']} inserted, folded back"
    return "trained as batch norm" if bn["graph_batchnorm"] else "none"


def _grid(rows: list, base: float) -> str:
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
        for r in rows
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
    head = (
        f"ResNet-56 (zoo export, BN kept) on CIFAR-10 (JPEG copy), original top-1 {base:.2%} on all 10,000 test images"
    )
    return "\n".join([head, "", *table(header, rows)])


if __name__ == "__main__":
    main()
