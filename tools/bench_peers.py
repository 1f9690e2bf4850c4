"""carve side by side with Torch-Pruning (``pip install "carve[peers]"``: torch-pruning, the most used structural
pruner; https://github.com/VainF/Torch-Pruning).

Per model: Torch-Pruning's ``MagnitudePruner`` (L1 magnitude importance, ``global_pruning=False``, the same
``--ratio`` in every layer, the classifier left alone as its examples do) prunes the PyTorch module; its result is
exported to ONNX with carve's exporter. carve then prunes the original's ONNX graph with L1 to the **same MAC count**
(``target_macs`` = Torch-Pruning's MAC ratio, checked within 1%), once with channels as they fall (round-to 1) and
once in multiples of 8. All three are measured with ``carve bench``'s interleaved A/B rounds on ONNX Runtime CPU, one
thread, batch 1 and 8: Torch-Pruning against the original, and carve against Torch-Pruning (A = Torch-Pruning, so a
speed-up above 1 means carve's model is faster).

For CIFAR ResNet-56 (trained weights from ../shared) also top-1 on ``--eval-samples`` test images with no repair, and
with each tool's best recovery that needs no training: carve's least-squares refit (``fuse lsq``) on 256 training
images; Torch-Pruning has no post-training repair of its own, so it gets BatchNorm re-estimation on the same 256 images
(the usual no-training recovery for a pruned PyTorch model). With ``--finetune-only EPOCHS`` both tools' unrepaired
ResNet-56 models (Torch-Pruning's and carve's round-to 8) are fine-tuned with the same budget and the same trainer
(``carve finetune``'s defaults: distillation from the original plus cross-entropy, on the 10,000-image train subset,
one thread each, both at once) and evaluated on the same test images; the row is added to the existing JSON.

    python tools/bench_peers.py                      # all models -> benchmarks/peers.json
    python tools/bench_peers.py --models resnet56 --rounds 5 -o /tmp/peers.json    # a smoke test
    python tools/bench_peers.py --finetune-only 3     # add the equal-budget fine-tuning comparison
    python tools/bench_peers.py --markdown
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchio import document, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ["resnet56", "resnet18", "resnet50", "mobilenet_v2", "vgg16_bn"]


def residual_stream(net) -> list:
    """The convolutions writing into a CIFAR ResNet's residual stream (the stem and each block's second conv)."""
    stream = [net.conv1] if hasattr(net, "layer1") and hasattr(net, "linear") else []
    return stream + [m.conv2 for m in net.modules() if type(m).__name__ == "BasicBlock" and hasattr(m, "pad")]


def tp_prune(name: str, ratio: float) -> tuple:
    """The zoo model pruned by Torch-Pruning's MagnitudePruner (L1, per layer, classifier kept), and how.

    Torch-Pruning traces dependencies through torch ops; the CIFAR ResNets' option-A shortcut (a strided slice and a
    channel zero-pad) is not traced, so the pruned module no longer runs. Then the residual stream's convolutions are
    left alone (``ignored_layers``) and only the blocks' inner channels are pruned; the row says so."""
    import torch
    import torch_pruning as tp

    from carve import models

    spec = models.spec(name)
    example = torch.randn(1, *spec.input_shape)
    setup, first_error = "as documented", None
    for attempt in ("plain", "residual stream ignored"):
        net = models.build(name)
        ignored = [m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.out_features == spec.num_classes]
        if attempt != "plain":
            ignored += residual_stream(net)
        pruner = tp.pruner.MagnitudePruner(
            net,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=ignored,
        )
        pruner.step()
        try:
            with torch.no_grad():
                net.eval()(example)
            return net, setup, first_error
        except RuntimeError as exc:
            if attempt != "plain" or not residual_stream(net):
                raise
            first_error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            setup = "residual stream ignored (the pruned module did not run: option-A shortcut not traced)"
    raise AssertionError("unreachable")


def to_onnx_like(net, name: str, original: Path, out: Path) -> None:
    """Export a torch module as carve's zoo export does, with the original's metadata (its preprocessing)."""
    import onnx

    from carve import models
    from carve.models.export import to_onnx

    spec = models.spec(name)
    proto = to_onnx(net, (1, *spec.input_shape), spec.outputs)
    for p in onnx.load(str(original), load_external_data=False).metadata_props:
        proto.metadata_props.add(key=p.key, value=p.value)
    onnx.save(proto, str(out))


def bn_recalibrate(net, images) -> None:
    """BatchNorm statistics re-estimated on ``images`` (a cumulative average, no weights trained)."""
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for k in range(0, len(images), 64):
            net(torch.as_tensor(images[k : k + 64]))
    net.eval()


def carve_prune(src: Path, dst: Path, macs: float, round_to: int, fuse: str | None = None, calib=None) -> dict:
    from carve import PruneOptions, load, prune_model, save

    m = load(src)
    opts = PruneOptions(criterion="l1", target_macs=macs, round_to=round_to, repairs=[fuse] if fuse else [])
    report = prune_model(m, opts, calib=calib)
    save(report.model, dst)
    return report.to_json()


def macs_of(p: Path) -> int:
    from carve.pipeline.graph import load
    from carve.pipeline.graph.cost import model_cost

    return model_cost(load(p)).macs


def bench(a: Path, b: Path, args) -> dict:
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    cfg = MeasureConfig(
        batch=[1, 8], threads=[1], rounds=args.rounds, min_round_ms=args.min_round_ms, memory=False, agreement=False
    )
    return {
        str(r["batch"]): {
            "a_ms": r["a"]["median_ms"],
            "b_ms": r["b"]["median_ms"],
            "speedup": r["speedup"]["median"],
            "ci": [r["speedup"]["ci_low"], r["speedup"]["ci_high"]],
        }
        for r in compare(a, b, cfg)["results"]
    }


def run_model(name: str, args, tmp: Path) -> dict:
    from carve import models

    orig, tp_path = tmp / f"{name}.onnx", tmp / f"{name}_tp.onnx"
    models.export(name, orig)
    t0 = time.perf_counter()
    net, setup, tp_error = tp_prune(name, args.ratio)
    tp_seconds = time.perf_counter() - t0
    to_onnx_like(net, name, orig, tp_path)
    m0, m_tp = macs_of(orig), macs_of(tp_path)
    target = m_tp / m0
    row: dict = {
        "model": name,
        "ratio": args.ratio,
        "macs_original": m0,
        "tp": {"macs_ratio": target, "seconds": round(tp_seconds, 2), "setup": setup, "plain_error": tp_error},
        "weights": "trained" if models.has_trained_weights(name) else "random",
    }
    row["tp"]["vs_original"] = bench(orig, tp_path, args)
    for rt in (1, 8):
        dst = tmp / f"{name}_carve_r{rt}.onnx"
        t0 = time.perf_counter()
        carve_prune(orig, dst, target, rt)
        got = macs_of(dst) / m0
        row[f"carve_r{rt}"] = {
            "macs_ratio": got,
            "macs_within_1pct": abs(got - target) <= 0.01 * target,
            "seconds": round(time.perf_counter() - t0, 2),
            "vs_tp": bench(tp_path, dst, args),
        }
    if name == "resnet56" and args.shared is not None:
        row["accuracy"] = accuracy_resnet56(net, orig, tp_path, tmp, target, args)
    return row


def accuracy_resnet56(net, orig: Path, tp_path: Path, tmp: Path, target: float, args) -> dict:
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load
    from carve.pipeline.measure.evaluate import evaluate

    data = args.shared / "data" / "cifar10"
    model = load(orig)
    test = load_data(data / "test.npz", model=model, samples=args.eval_samples, seed=1)
    calib = load_data(data / "train_subset.npz", model=model, samples=256, seed=0)
    out = {"eval_samples": args.eval_samples, "original": evaluate(model, test)["top1"]}
    out["tp"] = evaluate(load(tp_path), test)["top1"]
    bn_recalibrate(net, calib.arrays()[0])
    tp_bn = tmp / "resnet56_tp_bn.onnx"
    to_onnx_like(net, "resnet56", orig, tp_bn)
    out["tp+bn_recalibration"] = evaluate(load(tp_bn), test)["top1"]
    for rt in (1, 8):
        out[f"carve_r{rt}"] = evaluate(load(tmp / f"resnet56_carve_r{rt}.onnx"), test)["top1"]
        dst = tmp / f"resnet56_carve_r{rt}_lsq.onnx"
        carve_prune(orig, dst, target, rt, fuse="lsq", calib=calib)
        out[f"carve_r{rt}+lsq"] = evaluate(load(dst), test)["top1"]
    return out


def finetune_one(student: str, teacher: str, epochs: float, eval_samples: int) -> dict:
    """``carve finetune``'s defaults on one pruned model (run in a worker process, one thread)."""
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import shared_dir
    from carve.pipeline.graph import load
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.training.finetune import FinetuneOptions, finetune

    data = shared_dir() / "data" / "cifar10"
    model, original = load(student), load(teacher)
    train = load_data(data / "train_subset.npz", model=model)
    test = load_data(data / "test.npz", model=model, samples=eval_samples, seed=1)
    t0 = time.process_time()
    result = finetune(model, train, FinetuneOptions(epochs=epochs, threads=1), teacher=original)
    return {
        "top1": evaluate(result.model, test)["top1"],
        "train_cpu_min": round((time.process_time() - t0) / 60, 2),
        "images_per_s": result.summary.get("images_per_s"),
    }


def finetune_resnet56(doc: dict, epochs: float, args, tmp: Path) -> None:
    """Both tools' unrepaired ResNet-56 models, fine-tuned with the same budget and trainer (added to ``doc``)."""
    from concurrent.futures import ProcessPoolExecutor

    from carve import models

    row = next(r for r in doc["rows"] if r["model"] == "resnet56" and "error" not in r)
    orig, tp_path, carve_path = tmp / "resnet56.onnx", tmp / "resnet56_tp.onnx", tmp / "resnet56_carve_r8.onnx"
    models.export("resnet56", orig)
    net, setup, _ = tp_prune("resnet56", args.ratio)
    to_onnx_like(net, "resnet56", orig, tp_path)
    target = macs_of(tp_path) / macs_of(orig)
    carve_prune(orig, carve_path, target, 8)
    with ProcessPoolExecutor(2) as pool:
        jobs = {
            k: pool.submit(finetune_one, str(p), str(orig), epochs, args.eval_samples)
            for k, p in (("tp", tp_path), ("carve_r8", carve_path))
        }
        got = {k: j.result() for k, j in jobs.items()}
    row["finetune"] = {"epochs": epochs, "eval_samples": args.eval_samples, "tp_setup": setup, **got}


def markdown(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        if "error" in r:
            rows.append([r["model"], "-", f"failed: {r['error']}", "-", "-", "-", "-"])
            continue

        def s(x: dict, b: str) -> str:
            v = x[b]
            return f"{v['speedup']:.2f}x ({v['ci'][0]:.2f}-{v['ci'][1]:.2f})"

        tp, c1, c8 = r["tp"], r["carve_r1"], r["carve_r8"]
        rows.append(
            [
                r["model"],
                f"{tp['macs_ratio']:.3f} / {c1['macs_ratio']:.3f} / {c8['macs_ratio']:.3f}",
                f"{tp['vs_original']['1']['a_ms']:.2f}",
                s(tp["vs_original"], "1"),
                f"{s(c1['vs_tp'], '1')}; {s(c1['vs_tp'], '8')}",
                f"{s(c8['vs_tp'], '1')}; {s(c8['vs_tp'], '8')}",
                r["weights"] + ("" if r["tp"]["setup"] == "as documented" else "; TP: residual stream kept"),
            ]
        )
    lines = table(
        [
            "model",
            "MAC ratio TP / carve r1 / carve r8",
            "original ms (b1)",
            "TP speed-up over original (b1)",
            "carve r1 over TP (b1; b8)",
            "carve r8 over TP (b1; b8)",
            "weights",
        ],
        rows,
    )
    acc = next((r.get("accuracy") for r in doc["rows"] if r.get("accuracy")), None)
    if acc:
        lines += [
            "",
            f"ResNet-56 top-1 on {acc['eval_samples']} test images (original {acc['original']:.2%}), no training:",
            "",
            *table(
                ["Torch-Pruning", "TP + BN re-estimation", "carve r1", "carve r1 + lsq", "carve r8", "carve r8 + lsq"],
                [
                    [
                        f"{acc[k]:.2%}"
                        for k in ("tp", "tp+bn_recalibration", "carve_r1", "carve_r1+lsq", "carve_r8", "carve_r8+lsq")
                    ]
                ],
            ),
        ]
    ft = next((r.get("finetune") for r in doc["rows"] if r.get("finetune")), None)
    if ft:
        lines += [
            "",
            f"ResNet-56 top-1 on {ft['eval_samples']} test images after the same fine-tuning ({ft['epochs']:g} epochs "
            "of `carve finetune`'s defaults from each tool's unrepaired model):",
            "",
            *table(
                ["Torch-Pruning + fine-tuning", "carve r8 + fine-tuning", "train CPU min (TP / carve)"],
                [
                    [
                        f"{ft['tp']['top1']:.2%}",
                        f"{ft['carve_r8']['top1']:.2%}",
                        f"{ft['tp']['train_cpu_min']:.1f} / {ft['carve_r8']['train_cpu_min']:.1f}",
                    ]
                ],
            ),
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning's per-layer pruning ratio")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--min-round-ms", type=float, default=50)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "peers.json"))
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--finetune-only", type=float, metavar="EPOCHS", help="add the fine-tuning comparison to -o")
    args = ap.parse_args()
    try:
        import torch_pruning
    except ImportError:
        sys.exit('bench_peers needs Torch-Pruning: pip install "carve[peers]"')
    from carve.pipeline.data.shared import shared_dir

    args.shared = shared_dir()
    import torch

    torch.set_num_threads(1)
    if args.finetune_only:
        doc = json.loads(Path(args.output).read_text())
        with tempfile.TemporaryDirectory(prefix="carve-peers-") as tmp:
            finetune_resnet56(doc, args.finetune_only, args, Path(tmp))
        write(doc, args.output, markdown, args.markdown)
        return
    started = time.time()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="carve-peers-") as tmp:
        for name in args.models.split(","):
            print(f"{name}...", file=sys.stderr)
            try:
                rows.append(run_model(name, args, Path(tmp)))
            except Exception as exc:  # a tool that cannot prune a model is a result, plainly reported
                traceback.print_exc()
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    doc = document(
        "peers",
        started,
        torch_pruning=getattr(torch_pruning, "__version__", "?"),  # 1.6.1's wheel says 1.6.0 here
        torch_pruning_dist=importlib.metadata.version("torch-pruning"),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
        rows=rows,
    )
    write(doc, args.output, markdown, args.markdown)


if __name__ == "__main__":
    main()
