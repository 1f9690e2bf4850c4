"""Benchmark prune x quantize as one pipeline: original FP32, INT8, pruned (0.5 of the MACs, aligned) and pruned + INT8,
on ONNX Runtime CPU and OpenVINO CPU, side by side.

Speed (``--part speed``): for every model, engine, thread count and batch size the four variants are built once and
timed in interleaved rounds (each round times every variant in a rotated order); a variant's speed-up is the median of
its per-round ratios to FP32, with a 95% bootstrap interval. Plus file size, peak memory (fresh process, batch 8,
1 thread) and which kernels ran (ORT's optimised graph: integer kernels; OpenVINO: layers executed in u8/i8).

Accuracy (``--part accuracy``): the trained CIFAR ResNet-20 / ResNet-56 (../shared/models) on the 10,000 CIFAR-10 test
images: FP32, INT8 (512 calibration images from the training subset), pruned + distillation fine-tuned, and that
pruned model + INT8.

Models: ResNet-18, ResNet-50, MobileNetV2 and the zoo detector are random weights with BatchNorm re-estimated on 256
CIFAR images resized to their input (no ImageNet here). YOLOv8n (``--models yolov8n``, needs the ``coverage`` extra's
ultralytics) is built from ``yolov8n.yaml`` by tools/bench_coverage.py's builder (nothing downloaded), random weights
with BatchNorm re-estimated on random batches as bench_coverage does, 640x640 input. Exports: carve's zoo export /
bench_coverage's (TorchScript exporter, opset 17, BN unfused: ORT's quantization pre-processing folds it into the
convs). INT8: ``carve quantize`` defaults (minmax, per-channel
symmetric INT8 weights, per-tensor UINT8 activations). Pruning: L1, uniform, ``target_macs=0.5``, ``round_to=16``
(8 for the CIFAR ResNets).

    python tools/bench_int8.py                     # everything -> benchmarks/int8.json
    python tools/bench_int8.py --part speed --models resnet18 --rounds 5
    python tools/bench_int8.py --markdown          # print the README table of the stored JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchio import table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPEED_MODELS = ["resnet20", "resnet56", "resnet18", "mobilenet_v2", "detector", "resnet50", "yolov8n"]
# not in carve's zoo: built by tools/bench_coverage.py's builders (optional ``coverage`` extra)
BUILT = {"yolov8n"}
CIFAR = ["resnet20", "resnet56"]
VARIANTS = ["fp32", "int8", "pruned", "pruned_int8"]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def shared(*parts: str) -> Path:
    from carve.pipeline.data.shared import shared_file

    p = shared_file(*parts)
    if p is None:
        raise SystemExit(f"missing ../shared/{'/'.join(parts)}")
    return p


def bn_recalibrate(net, images: np.ndarray) -> None:
    """BatchNorm statistics re-estimated on ``images`` (a cumulative average; no weights trained)."""
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for k in range(0, len(images), 32):
            net(torch.as_tensor(images[k : k + 32]))
    net.eval()


def export_fp32(name: str, out: Path, calib_npz: Path) -> None:
    """The zoo export; random-weight models get their BatchNorm statistics re-estimated first."""
    if name in BUILT:
        export_built_model(name, out)
        return
    from carve import models
    from carve.models.export import to_onnx
    from carve.pipeline.data.datasets import Preprocess, load_data
    from carve.pipeline.graph import load, save

    models.export(name, out)
    if models.has_trained_weights(name):
        return
    import onnx

    m = load(out)
    images, _ = load_data(calib_npz, model=m, preprocess=Preprocess.for_model(m), samples=256, seed=7).arrays()
    net = models.build(name)
    bn_recalibrate(net, images.astype(np.float32))
    spec = models.spec(name)
    proto = to_onnx(net, (1, *spec.input_shape), spec.outputs)
    for p in onnx.load(str(out), load_external_data=False).metadata_props:
        proto.metadata_props.add(key=p.key, value=p.value if p.key != "carve.weights" else "random, BN re-estimated")
    out.unlink()
    save(proto, out)


def export_built_model(name: str, out: Path) -> None:
    """A model of tools/bench_coverage.py (built from its config, random weights, BatchNorm re-estimated there)."""
    import torch
    from bench_coverage import MODELS, reestimate_bn
    from bench_transformers import export_built

    torch.manual_seed(0)
    m, spec, source = MODELS[name]()
    reestimate_bn(m, spec)
    export_built(m, spec, source, out)


def prune(src: Path, dst: Path, round_to: int) -> float:
    from carve import PruneOptions, load, prune_model, save
    from carve.pipeline.graph.cost import model_cost

    m = load(src)
    report = prune_model(m, PruneOptions(criterion="l1", target_macs=0.5, round_to=round_to))
    save(report.model, dst)
    return model_cost(report.model).macs / model_cost(m).macs


def align(name: str) -> int:
    """Channel alignment: 16 (ORT's blocked CPU kernels, docs/latency.md); 8 for the CIFAR ResNets, whose 16-wide
    first stage cannot reach half the MACs at 16."""
    return 8 if name in CIFAR else 16


def quantize(src: Path, dst: Path, calib_npz: Path, samples: int) -> dict:
    from carve.pipeline.data.datasets import Preprocess, load_data
    from carve.pipeline.flows.passes import run_passes
    from carve.pipeline.graph import load
    from carve.pipeline.passes import build

    m = load(src)
    data = load_data(calib_npz, model=m, preprocess=Preprocess.for_model(m), samples=samples, seed=3)
    s = run_passes(src, dst, [build("quantize")], model=m, calib=data).results[0].summary
    return {
        "calibration_samples": s["calibration_samples"],
        "int8_compute_nodes": f"{s['int8_compute_nodes']}/{s['compute_nodes']}",
        "agreement_on_calibration": next(iter(s["agreement"]["outputs"].values())),
        "ort_kernels": s["kernels"],
    }


def time_four(paths: dict[str, Path], backend: str, threads: int, batch: int, rounds: int) -> dict:
    """Interleaved rounds of the four variants on one engine; speed-ups over FP32 with 95% intervals."""
    from carve.pipeline.measure.backends import EngineConfig, build
    from carve.pipeline.measure.stats import bootstrap_median_ci

    engines = {v: build(backend, p, EngineConfig(batch=batch, threads=threads)) for v, p in paths.items()}
    for e in engines.values():
        for _ in range(2):
            e.run()
    t0 = time.perf_counter()
    engines["fp32"].run()
    one = max(time.perf_counter() - t0, 1e-4)
    iters = max(1, int(0.15 / one))  # rounds of ~150 ms of the FP32 model
    per: dict[str, list[float]] = {v: [] for v in engines}
    names = list(engines)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for v in order:
            per[v].append(engines[v].time(iters) / iters)
    out = {}
    fp32 = np.array(per["fp32"])
    for v in names:
        t = np.array(per[v])
        med, lo, hi = bootstrap_median_ci(fp32 / t)
        out[v] = {
            "median_ms": round(float(np.median(t)) * 1e3, 3),
            "speedup": [round(med, 3), round(lo, 3), round(hi, 3)],
        }
    info = {v: e.info() for v, e in engines.items()}
    if backend == "openvino":
        out["openvino_int8_layers"] = {v: info[v]["int8_layers"] for v in names}
        out["openvino_inference_precision"] = info["fp32"]["inference_precision"]
    for e in engines.values():
        e.close()
    return out


def speed(name: str, args, work: Path) -> dict:
    from carve.pipeline.graph import load
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.measure.memory import measure_in_fresh_process

    t0 = time.time()
    calib = shared("data", "cifar10", "train_subset.npz")
    paths = {v: work / f"{name}_{v}.onnx" for v in VARIANTS}
    export_fp32(name, paths["fp32"], calib)
    macs_ratio = prune(paths["fp32"], paths["pruned"], align(name))
    n = 512 if name in CIFAR else 128
    q = {v: quantize(paths[s], paths[v], calib, n) for v, s in (("int8", "fp32"), ("pruned_int8", "pruned"))}
    row = {
        "model": name,
        "weights": "trained (CIFAR-10)" if name in CIFAR else "random, BN re-estimated",
        "input": list(load(paths["fp32"]).shape(load(paths["fp32"]).input_names[0])[1:]),
        "gmacs": round(model_cost(load(paths["fp32"])).macs / 1e9, 3),
        "pruned_macs_ratio": round(macs_ratio, 3),
        "file_mb": {v: round(sum(f.stat().st_size for f in work.glob(f"{name}_{v}.onnx*")) / 1e6, 3) for v in VARIANTS},
        "quantize": q,
        "timings": {},
        "peak_memory_mb": {},
    }
    for backend in args.backends:
        for threads in args.threads:
            for batch in args.batch:
                key = f"{backend} t{threads} b{batch}"
                print(f"  {name}: {key}", flush=True)
                row["timings"][key] = time_four(paths, backend, threads, batch, args.rounds)
        row["peak_memory_mb"][backend] = {
            v: round(measure_in_fresh_process(p, backend, batch=8, threads=1)["peak_rss_bytes"] / 1e6, 1)
            for v, p in paths.items()
        }
    row["seconds"] = round(time.time() - t0)
    return row


def accuracy(name: str, args, work: Path) -> dict:
    from carve.pipeline.data.datasets import Preprocess, load_data
    from carve.pipeline.flows.finetune import finetune_file
    from carve.pipeline.graph import load
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.training.finetune import FinetuneOptions

    t0 = time.time()
    train = shared("data", "cifar10", "train_subset.npz")
    test = shared("data", "cifar10", "test.npz")
    paths = {v: work / f"acc_{name}_{v}.onnx" for v in VARIANTS}
    export_fp32(name, paths["fp32"], train)
    prune(paths["fp32"], work / f"acc_{name}_raw.onnx", align(name))
    opts = FinetuneOptions(epochs=args.epochs[name], threads=1)
    finetune_file(work / f"acc_{name}_raw.onnx", paths["pruned"], str(train), opts, teacher_path=paths["fp32"])
    q = {v: quantize(paths[s], paths[v], train, 512) for v, s in (("int8", "fp32"), ("pruned_int8", "pruned"))}
    m = load(paths["fp32"])
    data = load_data(test, model=m, preprocess=Preprocess.for_model(m), samples=args.test_samples, seed=1)
    top1 = {v: round(evaluate(load(p), data)["top1"], 4) for v, p in paths.items()}
    return {
        "model": name,
        "test_images": len(data),
        "finetune_epochs": args.epochs[name],
        "calibration_images": 512,
        "top1": top1,
        "drop_points": {v: round(100 * (top1["fp32"] - top1[v]), 2) for v in VARIANTS[1:]},
        "agreement_on_calibration": {v: q[v]["agreement_on_calibration"] for v in q},
        "seconds": round(time.time() - t0),
    }


def update(output: Path, key: str, name: str, value: dict, meta: dict) -> None:
    """Read-modify-write of the shared JSON under a lock (the speed and accuracy parts may run at once)."""
    from filelock import FileLock

    from carve.pipeline.measure.environment import environment

    output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(tempfile.gettempdir()) / f"bench-int8-{output.name}.lock")):
        doc = json.loads(output.read_text()) if output.is_file() else {"benchmark": "int8"}
        doc["environment"] = {**environment(), "cpu_flags": cpu_flags()}
        doc.update(meta)
        doc.setdefault(key, {})[name] = value
        tmp = output.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(output)


def fmt(s: list[float]) -> str:
    return f"{s[0]:.2f}x ({s[1]:.2f}-{s[2]:.2f})"


def markdown(doc: dict) -> str:
    env = doc.get("environment", {})
    lines = [
        f"CPU: {env.get('cpu', '?')}, {env.get('logical_cpus', '?')} logical CPUs, integer/vector instructions: "
        f"{', '.join(env.get('cpu_flags', [])) or '?'}; onnxruntime {env.get('onnxruntime', '?')}, "
        f"openvino {doc.get('openvino', '?')}.",
        "",
    ]
    rows = []
    for name, r in doc.get("speed", {}).items():
        for key, t in r["timings"].items():
            rows.append(
                [
                    name,
                    key,
                    f"{t['fp32']['median_ms']:.2f}",
                    fmt(t["int8"]["speedup"]),
                    fmt(t["pruned"]["speedup"]),
                    fmt(t["pruned_int8"]["speedup"]),
                ]
            )
    lines += table(
        ["model", "engine threads batch", "FP32 ms", "INT8", "pruned 0.5", "pruned + INT8"],
        rows,
    )
    for name, r in doc.get("speed", {}).items():
        if "separate_run" in r:  # a row merged from another run of this script
            run = r["separate_run"]
            lines += [
                "",
                f"{name}: from a separate run ({run['command']}; load average {run['load_average']}).",
            ]
    lines.append("")
    rows = []
    for name, r in doc.get("speed", {}).items():
        f, m = r["file_mb"], r["peak_memory_mb"]
        mem = " / ".join(f"{b}: " + ", ".join(f"{m[b][v]:.0f}" for v in VARIANTS) for b in m)
        k = r["quantize"]["int8"]["ort_kernels"]
        rows.append(
            [
                name,
                r["weights"],
                ", ".join(f"{f[v]:.1f}" for v in VARIANTS),
                mem,
                f"{k['verdict']} ({', '.join(f'{o} {c}' for o, c in k['integer_ops'].items())})",
            ]
        )
    lines += table(
        [
            "model",
            "weights",
            "file MB (FP32, INT8, pruned, pruned+INT8)",
            "peak MB b8 (same order)",
            "ORT INT8 kernels",
        ],
        rows,
    )
    if doc.get("accuracy"):
        lines.append("")
        rows = [
            [
                name,
                r["test_images"],
                r["finetune_epochs"],
                *(f"{100 * r['top1'][v]:.2f}" for v in VARIANTS),
                f"{r['drop_points']['int8']:.2f}",
                f"{r['drop_points']['pruned_int8']:.2f}",
            ]
            for name, r in doc["accuracy"].items()
        ]
        lines += table(
            [
                "model",
                "test images",
                "fine-tune epochs",
                "FP32 top-1",
                "INT8",
                "pruned",
                "pruned + INT8",
                "INT8 drop (pts)",
                "pruned+INT8 drop (pts)",
            ],
            rows,
        )
    lines += ["", *targets(doc)]
    return "\n".join(lines)


def targets(doc: dict) -> list[str]:
    """Issue 23's targets, each met or missed by how much (from the JSON, so the README cannot disagree)."""
    out = []
    acc, sp = doc.get("accuracy", {}), doc.get("speed", {})
    if "resnet56" in acc:
        d = acc["resnet56"]["drop_points"]["int8"]
        out.append(
            f"- INT8 within 0.5 point of FP32 top-1 on ResNet-56 (512 calibration images): "
            f"{'met' if d <= 0.5 else f'missed by {d - 0.5:.2f}'} ({d:+.2f} points)."
        )
    for name, r in acc.items():
        d = r["drop_points"]["pruned_int8"]
        out.append(
            f"- pruned (0.5 MACs, {r['finetune_epochs']:g}-epoch fine-tune) + INT8 within 1.5 points of the FP32 "
            f"original on {name}: {'met' if d <= 1.5 else f'missed by {d - 1.5:.2f}'} ({d:+.2f} points)."
        )
    for name in ("resnet50", "resnet18"):
        if name not in sp:
            continue
        got = {k: t["pruned_int8"]["speedup"][0] for k, t in sp[name]["timings"].items() if k.startswith("ort t1 ")}
        for k, v in got.items():
            out.append(
                f"- pruned + INT8 >= 3.5x faster than FP32 on {name}, {k}: "
                f"{'met' if v >= 3.5 else f'missed ({v:.2f}x)'}."
            )
    engines = {k.split()[0] for r in sp.values() for k in r["timings"]}
    out.append(f"- OpenVINO beside ONNX Runtime for every row: {'met' if 'openvino' in engines else 'missed'}.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["speed", "accuracy", "all"], default="all")
    ap.add_argument("--models", default=",".join(SPEED_MODELS))
    ap.add_argument("--backends", default="ort,openvino")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--epochs", default="resnet20=3,resnet56=3", help="fine-tune epochs per CIFAR model")
    ap.add_argument("--test-samples", type=int, default=None, help="CIFAR test images (default all 10,000)")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "int8.json"))
    ap.add_argument("--markdown", action="store_true", help="print the README table of the stored JSON and exit")
    args = ap.parse_args()
    out = Path(args.output)
    if args.markdown:
        print(markdown(json.loads(out.read_text())))
        return
    args.backends = args.backends.split(",")
    args.threads = [int(v) for v in args.threads.split(",")]
    args.batch = [int(v) for v in args.batch.split(",")]
    args.epochs = {k: float(v) for k, v in (p.split("=") for p in args.epochs.split(","))}
    import onnxruntime

    meta = {"method": __doc__.split("\n\n")[1:4], "onnxruntime": onnxruntime.__version__}
    try:
        import openvino

        meta["openvino"] = openvino.__version__
    except ImportError:
        meta["openvino"] = None
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(tmp)
        if args.part in ("accuracy", "all"):
            for name in [m for m in models if m in CIFAR]:
                print(f"accuracy {name}", flush=True)
                update(out, "accuracy", name, accuracy(name, args, work), meta)
        if args.part in ("speed", "all"):
            for name in models:
                print(f"speed {name}", flush=True)
                update(out, "speed", name, speed(name, args, work), meta)


if __name__ == "__main__":
    main()
