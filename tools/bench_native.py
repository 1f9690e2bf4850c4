"""Runner overhead: carve's torch-cuda engine against the same torchvision model run natively by PyTorch.

For each model and batch size, the torchvision module (the zoo's random weights, seed 0) and its ONNX export run in
the same engine machinery (:class:`carve.pipeline.measure.backends.torch_cuda.ModuleEngine`): the same precision
(weights converted once), ``channels_last``, CUDA graphs, CUDA events, interleaved rounds. Reported per row: both
medians, ``overhead`` = time(carve) / time(native) with its 95% bootstrap interval (1.00 = none), the settings each
engine applied (they must match, or the row is refused) and the outputs' agreement. This is what makes a torch-cuda
speed-up believable: the issue's target is an overhead within 10% at batch 32 and 128.

With ``--compile`` a second comparison puts carve's static program through ``torch.compile`` (inductor) against the
CUDA-graph default, on the same model.

    python tools/bench_native.py -o benchmarks/native_<gpu>.json                 # on an NVIDIA GPU
    python tools/bench_native.py --device cpu --models resnet18 --batch 1 --input-size 32 --rounds 2 -o /tmp/n.json
                                                                                 # the plumbing, on a CPU
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

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
MATCH = ("precision", "cuda_graphs", "channels_last", "compile")


def native_engine(name: str, batch: int, config, input_size: int | None):
    """torchvision's own module for ``name`` in the engine machinery carve's runner uses."""
    import numpy as np
    import torch

    from carve import models
    from carve.pipeline.measure.backends.torch_cuda import (
        ModuleEngine,
        memory_baseline,
        prepare_input,
        prepare_module,
        torch_settings,
    )

    settings = torch_settings(config, config.device)
    base = memory_baseline(torch, settings)
    module = models.build(name, input_size=input_size)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    shape = (batch, *models.spec(name).input(input_size))
    rng = np.random.default_rng(config.seed)
    x = prepare_input(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)), settings)
    with torch.no_grad():
        module = prepare_module(module, settings).eval()
    return ModuleEngine(
        module, [x], settings, weights_bytes=weights, base_bytes=base, extra_info={"program": "native torch"}
    )


def time_ratio(base, other, rounds: int, min_round_ms: float, warmup_ms: float, seed: int = 0) -> dict:
    """Interleaved rounds of two engines: ratio = time(other) / time(base) (1.00: as fast), with its 95% interval."""
    import numpy as np

    from carve.pipeline.measure.ab import interleave
    from carve.pipeline.measure.runners import LocalRunner
    from carve.pipeline.measure.stats import bootstrap_median_ci

    run = interleave(
        LocalRunner.of(other),
        LocalRunner.of(base),
        rounds=rounds,
        min_round_s=min_round_ms / 1000,
        warmup_s=warmup_ms / 1000,
    )  # per-round ratios are mean(other) / mean(base)
    med, lo, hi = bootstrap_median_ci(run.ratios, seed=seed)
    return {
        "base_ms": float(np.median(np.concatenate(run.b))) * 1e3,
        "other_ms": float(np.median(np.concatenate(run.a))) * 1e3,
        "ratio": med,
        "ci": [lo, hi],
        "rounds": rounds,
    }


def _named(r: dict, base: str, other: str, ratio: str) -> dict:
    return {base: r["base_ms"], other: r["other_ms"], ratio: r["ratio"], "ci": r["ci"], "rounds": r["rounds"]}


def measure(
    name: str,
    batch: int,
    precision: str,
    device: str,
    *,
    input_size: int | None = None,
    rounds: int = 10,
    min_round_ms: float = 50,
    warmup_ms: float = 200,
    directory: Path | None = None,
) -> dict:
    """One row: the native module against carve's engine of its ONNX export."""
    import numpy as np

    from carve import models
    from carve.pipeline.errors import CarveError
    from carve.pipeline.measure.backends import EngineConfig
    from carve.pipeline.measure.backends.torch_cuda import TorchEngine

    with tempfile.TemporaryDirectory(prefix="carve-native-") as tmp:
        path = Path(directory or tmp) / f"{name}_{input_size or 'default'}.onnx"
        if not path.exists():
            models.export(name, path, input_size=input_size)
        config = EngineConfig(batch=batch, precision=precision, device=device)
        native = native_engine(name, batch, config, input_size)
        carve = TorchEngine(path, config, device)
        info_n, info_c = native.info(), carve.info()
        differ = [k for k in MATCH if info_n.get(k) != info_c.get(k)]
        if differ:
            raise CarveError(f"{name} b{batch}: native and carve engines ran differently in {differ}")
        feeds = {"input": np.random.default_rng(1).standard_normal(tuple(carve.inputs[0].shape)).astype(np.float32)}
        yn, yc = native.outputs(feeds)[0], carve.outputs(feeds)[0]
        row = {
            "model": name,
            "batch": batch,
            "precision": precision,
            "input": list(carve.inputs[0].shape[1:]),
            **_named(time_ratio(native, carve, rounds, min_round_ms, warmup_ms), "native_ms", "carve_ms", "overhead"),
            "max_rel_diff": float(np.abs(yn - yc).max() / max(float(np.abs(yn).max()), 1e-6)),
            "native_engine": info_n,
            "carve_engine": info_c,
            "memory_mb": [
                (e.memory().get("device_memory_bytes") or 0) / 2**20 if device != "cpu" else None
                for e in (native, carve)
            ],
        }
        native.close()
        carve.close()
        return row


def compile_row(name: str, batch: int, precision: str, device: str, **kw) -> dict:
    """carve's static program through torch.compile (inductor) against the CUDA-graph default, same model."""
    from carve import models
    from carve.pipeline.measure.backends import EngineConfig
    from carve.pipeline.measure.backends.torch_cuda import TorchEngine

    input_size = kw.pop("input_size", None)
    with tempfile.TemporaryDirectory(prefix="carve-compile-") as tmp:
        path = Path(tmp) / f"{name}.onnx"
        models.export(name, path, input_size=input_size)
        default = TorchEngine(path, EngineConfig(batch=batch, precision=precision, device=device), device)
        compiled = TorchEngine(
            path, EngineConfig(batch=batch, precision=precision, device=device, compile=True), device
        )
        r = time_ratio(default, compiled, kw.get("rounds", 10), kw.get("min_round_ms", 50), kw.get("warmup_ms", 200))
        return {
            "model": name,
            "batch": batch,
            "precision": precision,
            **_named(r, "default_ms", "compiled_ms", "compiled_over_default"),
            "compile_seconds": compiled.info().get("compile_seconds"),
            "default_engine": default.info(),
            "compiled_engine": compiled.info(),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", default="1,32,128")
    ap.add_argument("--precision", default="fp16,fp32")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (the plumbing only)")
    ap.add_argument("--input-size", type=int, default=None, help="default: the models' 224")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-round-ms", type=float, default=50)
    ap.add_argument("--warmup-ms", type=float, default=200)
    ap.add_argument("--compile", action="store_true", help="also torch.compile vs the CUDA-graph default")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows, compiled = [], []
    kw = dict(input_size=args.input_size, rounds=args.rounds, min_round_ms=args.min_round_ms, warmup_ms=args.warmup_ms)
    with tempfile.TemporaryDirectory(prefix="carve-native-") as tmp:
        for name in args.models.split(","):
            for precision in args.precision.split(","):
                for batch in (int(b) for b in args.batch.split(",")):
                    rows.append(measure(name, batch, precision, args.device, directory=Path(tmp), **kw))
                    r = rows[-1]
                    print(
                        f"{name:16s} {precision} b{batch:<4d} native {r['native_ms']:8.3f} ms  "
                        f"carve {r['carve_ms']:8.3f} ms  overhead {r['overhead']:.3f} "
                        f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                        file=sys.stderr,
                        flush=True,
                    )
    if args.compile:
        for name in args.models.split(",")[:2]:
            compiled.append(compile_row(name, 32, "fp16", args.device, **kw))
    doc = document("native", t0, device=args.device, rows=rows, compile=compiled)
    write(doc, args.output, markdown, args.markdown)
    return 0


def markdown(doc: dict) -> str:
    """One row per (model, precision): overhead (95% CI) per batch size, and the native times."""
    rows = doc["rows"]
    batches = sorted({r["batch"] for r in rows})
    out = []
    for model, precision in dict.fromkeys((r["model"], r["precision"]) for r in rows):
        rs = {r["batch"]: r for r in rows if r["model"] == model and r["precision"] == precision}
        cells = [
            f"{rs[b]['overhead']:.2f}x ({rs[b]['ci'][0]:.2f}-{rs[b]['ci'][1]:.2f}), {rs[b]['native_ms']:.2f} ms"
            if b in rs
            else "-"
            for b in batches
        ]
        out.append([model, precision, *cells])
    lines = table(["model", "precision", *[f"carve / native b{b} (native ms)" for b in batches]], out)
    if doc.get("compile"):
        lines += [""] + table(
            ["model", "batch", "precision", "CUDA graphs ms", "torch.compile + CUDA graphs ms", "compiled / default"],
            [
                [
                    c["model"],
                    c["batch"],
                    c["precision"],
                    f"{c['default_ms']:.2f}",
                    f"{c['compiled_ms']:.2f}",
                    f"{c['compiled_over_default']:.2f}x ({c['ci'][0]:.2f}-{c['ci'][1]:.2f})",
                ]
                for c in doc["compile"]
            ],
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
