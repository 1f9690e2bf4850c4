"""The GPU evidence in one run, for a user with an NVIDIA GPU (about 7 minutes on an H100-class GPU, within 8):

1. the GPU-marked tests (``pytest -m gpu``): replayed CUDA graphs against ONNX Runtime on the CPU, memory per engine,
   no global state left behind, ONNX Runtime's GPU providers taking carve's options; then a timing sanity check
   (torch-cuda's replayed CUDA graph against its eager dispatch, ResNet-18 fp16 batch 1, interleaved: the graph must
   win; a failure makes the check exit 1);
2. every zoo ImageNet model against itself pruned (L1, ratio 0.5, channels in multiples of 8) at fp16 and fp32, batch 1
   and 32, on every GPU backend present (torch-cuda; ONNX Runtime's CUDA and TensorRT providers where they load;
   TensorRT where it is installed): interleaved rounds, speed-up with its 95% interval beside the MAC ratio, each
   engine's settings as applied and its device memory;
3. the runner's overhead against native PyTorch (``tools/bench_native.py``: ResNet-18/50, MobileNetV2, EfficientNet-B0
   at batch 1/32/128, fp16) and ``torch.compile`` against the CUDA-graph default (ResNet-50, batch 32, fp16);
4. ``benchmarks/gpu_<device>.json`` (device, driver, library versions, settings as applied, what was skipped and why)
   and the README's GPU section regenerated from it (``tools/update_readme.py``).

A time budget (``--budget-s``) keeps it inside 8 minutes: what does not fit is listed as skipped, never silently left
out. ``--dry-run`` runs the same plumbing on a CPU (torch-cpu and ONNX Runtime's CPU provider, tiny inputs) into the
file given with ``-o``; it measures nothing about GPUs and never writes under benchmarks/.

    python tools/gpu_check.py                      # on the GPU machine, from the repository root
    python tools/gpu_check.py --dry-run -o /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from benchio import table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

PRUNING = {"criterion": "l1", "ratio": 0.5, "round_to": 8}
NATIVE_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"]
NOT_MEASURED = (
    "**GPU figures are not measured yet**: no `benchmarks/gpu_<device>.json` is committed. On a machine with an NVIDIA "
    "GPU, `python tools/gpu_check.py` runs the GPU tests and these measurements and rewrites this section from its "
    "JSON."
)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def versions() -> tuple[dict, dict]:
    """Library versions and the GPU as this process sees them, and the measurement environment."""
    import onnxruntime
    import torch

    from carve.pipeline.measure.backends.trt import tensorrt_version
    from carve.pipeline.measure.environment import environment

    env = environment()
    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers_listed": onnxruntime.get_available_providers(),
        "tensorrt": tensorrt_version(),
        "carve": env.get("carve"),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["compute_capability"] = ".".join(str(v) for v in torch.cuda.get_device_capability(0))
    smi = env.get("nvidia_smi") or []
    if smi:
        fields = [f.strip() for f in smi[0].split(",")]
        out["driver"] = fields[1] if len(fields) > 1 else None
        out["nvidia_smi"] = smi
    return out, env


def run_gpu_tests(timeout: float) -> dict:
    """``pytest -m gpu`` on the GPU test modules; counts from its JUnit XML."""
    with tempfile.TemporaryDirectory(prefix="carve-gpu-tests-") as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        cmd += ["tests/test_gpu.py", "tests/test_backends.py"]
        t0 = time.time()
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            rc, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-15:]
        except subprocess.TimeoutExpired:
            return {"command": " ".join(cmd[2:]), "returncode": None, "error": f"timed out after {timeout:.0f} s"}
        out = {"command": "pytest " + " ".join(cmd[4:]), "returncode": rc, "seconds": round(time.time() - t0)}
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            out.update(passed=total - failed - skipped, failed=failed, skipped=skipped)
            out["failures"] = [
                f"{c.get('classname')}::{c.get('name')}"
                for c in suite.iter("testcase")
                if c.find("failure") is not None or c.find("error") is not None
            ]
            out["skip_reasons"] = sorted(
                {
                    (c.find("skipped").get("message") or "")[:160]
                    for c in suite.iter("testcase")
                    if c.find("skipped") is not None
                }
            )
        if rc not in (0, 5):
            out["tail"] = tail
        return out


def gpu_backends(dry_run: bool) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(label, backend, device) of every backend that runs here, and why each other one does not."""
    from carve.pipeline.errors import CarveError
    from carve.pipeline.measure.backends import EngineConfig, build, get

    if dry_run:
        return [("torch-cpu", "torch-cpu", "cpu"), ("ort-cpu", "ort", "cpu")], {"note": "dry run: CPU stand-ins"}
    present, absent = [], {}
    for backend in ("torch-cuda", "trt"):
        ok, why = get(backend).available()
        if ok:
            present.append((backend, backend, "cuda"))
        else:
            absent[backend] = why
    from carve import models

    with tempfile.TemporaryDirectory(prefix="carve-probe-") as tmp:
        probe = Path(tmp) / "lenet5.onnx"
        models.export("lenet5", probe)
        for device in ("cuda", "tensorrt"):
            try:
                build("ort", probe, EngineConfig(device=device)).close()
                present.append((f"ort-{device}", "ort", device))
            except CarveError as exc:
                absent[f"ort-{device}"] = exc.message
    return present, absent


def pair_rows(
    name: str, a: Path, b: Path, label: str, backend: str, device: str, precision: str, args, extra: dict
) -> list[dict]:
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    cfg = MeasureConfig(
        backend=backend,
        device=device,
        precision=precision,
        batch=args.batches,
        threads=[1],
        rounds=args.rounds,
        min_round_ms=args.min_round_ms,
        warmup_ms=args.warmup_ms,
        memory=False,
        agreement=False,
        **extra,
    )
    report = compare(a, b, cfg)
    rows = []
    for res in report["results"]:
        s = res["speedup"]
        rows.append(
            {
                "model": name,
                "backend": label,
                "precision": precision,
                "batch": res["batch"],
                "a_ms": res["a"]["median_ms"],
                "b_ms": res["b"]["median_ms"],
                "speedup": s["median"],
                "ci": [s["ci_low"], s["ci_high"]],
                "mac_ratio": res["mac_ratio"],
                "efficiency": res.get("speedup_efficiency"),
                "engine": res["a"]["engine"],  # A and B ran alike (compare refuses otherwise)
                "device_memory_mb": [
                    (res[k]["engine_memory"].get("device_memory_bytes") or 0) / 2**20 or None for k in ("a", "b")
                ],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this (s)")
    ap.add_argument("-o", "--output", help="default: benchmarks/gpu_<device>.json")
    ap.add_argument("--dry-run", action="store_true", help="the plumbing on a CPU (needs -o; measures no GPU)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--models", help="comma-separated (default: the zoo's ImageNet models)")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate the README")
    args = ap.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    import torch

    from carve import models

    if args.dry_run and not args.output:
        ap.error("--dry-run needs -o (a dry run never writes under benchmarks/)")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs an NVIDIA GPU: torch sees none (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    names = (
        args.models.split(",")
        if args.models
        else [n for n in models.available() if models.spec(n).family == "torchvision"]
    )
    input_size = 32 if args.dry_run else None
    args.batches = [1, 2] if args.dry_run else [1, 32]
    args.rounds, args.min_round_ms, args.warmup_ms = (2, 5, 10) if args.dry_run else (8, 25, 100)
    ver, env = versions()
    device_name = ver.get("gpu") or "cpu-dry-run"
    doc: dict = {
        "benchmark": "gpu",
        "device": device_name,
        "dry_run": args.dry_run,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": ver,
        "environment": env,
        "pruning": PRUNING,
        "method": f"interleaved rounds ({args.rounds} x >= {args.min_round_ms} ms per model), speed-up = median of "
        "per-round time(A)/time(B) with a 95% bootstrap CI; MAC ratio = MACs(B)/MACs(A), not a speed-up",
        "skipped": [],
    }
    if args.skip_tests or args.dry_run:
        doc["tests"] = {"skipped": "not run" + (" (dry run)" if args.dry_run else " (--skip-tests)")}
    else:
        print("GPU tests ...", file=sys.stderr, flush=True)
        doc["tests"] = run_gpu_tests(timeout=max(60.0, min(240.0, deadline - time.time() - 120)))
    present, absent = gpu_backends(args.dry_run)
    doc["backends"] = {"measured": [p[0] for p in present], "not available": absent}
    rows: list[dict] = []
    extra_ort = {"provider_options": {"cudnn_conv_algo_search": "HEURISTIC"}}  # exhaustive search would not fit

    def left(what: str, need_s: float = 0.0) -> bool:
        """Whether ``what`` (expected to take about ``need_s``) still fits the budget; if not it is listed."""
        if time.time() + need_s < deadline:
            return True
        doc["skipped"].append(f"{what}: time budget ({args.budget_s:.0f} s) spent")
        return False

    # what each backend's pair of engines costs to build, roughly (TensorRT builds dominate)
    cost = {"torch-cuda": 5, "torch-cpu": 0, "ort-cpu": 0, "ort-cuda": 20, "ort-tensorrt": 90, "trt": 120}

    def measure_pairs(label: str, backend: str, device: str, pairs) -> None:
        for name, a, b in pairs:
            for precision in ("fp16", "fp32"):
                what = f"{name} {label} {precision}"
                if not left(what, cost.get(label, 30)):
                    continue
                print(what, file=sys.stderr, flush=True)
                # ORT's GPU providers with CUDA graphs, as torch-cuda and trt run by default; without them if refused
                tries = (
                    [{**extra_ort, "cuda_graphs": True}, extra_ort] if backend == "ort" and device != "cpu" else [{}]
                )
                for k, extra in enumerate(tries):
                    try:
                        rows.extend(pair_rows(name, a, b, label, backend, device, precision, args, extra))
                        break
                    except Exception as exc:  # one configuration that cannot run must not lose the others
                        again = "; measured without CUDA graphs" if k + 1 < len(tries) else ""
                        doc["skipped"].append(
                            f"{what}{' with CUDA graphs' if extra.get('cuda_graphs') else ''}: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}{again}"
                        )

    with tempfile.TemporaryDirectory(prefix="carve-gpu-check-") as tmp:
        from bench_backends import prune_copy

        pairs = []
        for name in names:
            a, b = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_p.onnx"
            models.export(name, a, input_size=input_size)
            prune_copy(a, b, PRUNING["ratio"], PRUNING["round_to"])
            pairs.append((name, a, b))
        # the cheap, central figures first (torch engines, runner overhead), then the other backends while time lasts
        first = [p for p in present if p[1].startswith("torch")]
        for label, backend, device in first:
            measure_pairs(label, backend, device, pairs)
        doc["sanity"] = replay_sanity(args, Path(tmp), input_size) if left("timing sanity", 10) else None
        doc["native"], doc["compile"] = native_and_compile(args, doc, left, Path(tmp), input_size)
        for label, backend, device in (p for p in present if p not in first):
            measure_pairs(label, backend, device, pairs)
        doc["rows"] = rows
    doc["seconds"] = round(time.time() - t0)
    out = Path(args.output) if args.output else REPO / "benchmarks" / f"gpu_{slug(device_name)}.json"
    write(doc, out, markdown, show=False)
    print(markdown(doc))
    print(f"wrote {out} in {doc['seconds']} s", file=sys.stderr)
    if not args.dry_run and not args.no_readme:
        subprocess.run([sys.executable, str(REPO / "tools" / "update_readme.py")], check=True, cwd=REPO)
        print("README GPU section regenerated", file=sys.stderr)
    t = doc["tests"]
    failed = bool(t.get("failed")) or "error" in t or t.get("returncode") not in (None, 0, 5)
    return 1 if failed or (doc.get("sanity") or {}).get("ok") is False else 0


def replay_sanity(args, tmp: Path, input_size: int | None) -> dict:
    """Whether the replayed CUDA graph beats eager dispatch (ResNet-18, fp16, batch 1, interleaved rounds): on a GPU
    the gap is several-fold, so a loss means the graph path is broken. Measured here, never asserted in a test."""
    import numpy as np

    from carve import models
    from carve.pipeline.measure.ab import interleave
    from carve.pipeline.measure.backends import EngineConfig, build, get

    backend = "torch-cpu" if args.dry_run else "torch-cuda"
    ok, why = get(backend).available()
    if not ok:
        return {"skipped": f"{backend}: {why}"}
    path = tmp / "sanity_resnet18.onnx"
    models.export("resnet18", path, input_size=input_size)

    class Runner:
        def __init__(self, graphs: bool) -> None:
            precision = "fp32" if args.dry_run else "fp16"
            self.engine = build(backend, path, EngineConfig(batch=1, precision=precision, cuda_graphs=graphs))

        def warmup(self, seconds: float) -> float:
            return float(np.median(self.engine.times(5)))

        def round(self, n: int) -> np.ndarray:
            return self.engine.times(n)

    graphs = not args.dry_run  # the CPU has no CUDA graphs: a dry run compares eager with itself
    result = interleave(
        Runner(False),
        Runner(graphs),
        rounds=args.rounds,
        min_round_s=args.min_round_ms / 1e3,
        warmup_s=args.warmup_ms / 1e3,
    )
    ratio = float(np.median(result.ratios))  # time(eager) / time(replayed)
    return {"model": "resnet18", "batch": 1, "eager_over_replayed": round(ratio, 3), "ok": ratio > 1.0 or args.dry_run}


def native_and_compile(args, doc: dict, left, tmp: Path, input_size: int | None) -> tuple[list, list]:
    import bench_native

    device = "cpu" if args.dry_run else "cuda"
    kw = dict(input_size=input_size, rounds=args.rounds, min_round_ms=args.min_round_ms, warmup_ms=args.warmup_ms)
    native = []
    batches = [1, 2] if args.dry_run else [1, 32, 128]
    for name in NATIVE_MODELS[:1] if args.dry_run else NATIVE_MODELS:
        for batch in batches:
            what = f"native {name} b{batch} fp16"
            if not left(what, 5):
                continue
            print(what, file=sys.stderr, flush=True)
            try:
                precision = "fp32" if args.dry_run else "fp16"
                native.append(bench_native.measure(name, batch, precision, device, directory=tmp, **kw))
            except Exception as exc:
                doc["skipped"].append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    compiled = []
    if args.dry_run:
        doc["skipped"].append("torch.compile vs CUDA graphs: not in a dry run (inductor on a CPU takes minutes)")
    elif left("torch.compile resnet50 b32 fp16", 120):
        try:
            compiled.append(bench_native.compile_row("resnet50", 32, "fp16", device, **kw))
        except Exception as exc:
            doc["skipped"].append(f"torch.compile resnet50: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return native, compiled


# ---------------------------------------------------------------------------------------------------------------------
# Markdown


def _settings(info: dict) -> str:
    from carve.pipeline.measure.report import engine_settings

    return engine_settings(info) or "-"


def markdown(doc: dict) -> str:
    """The GPU section of one device's document: original vs pruned per backend, then runner overhead and compile."""
    import bench_native

    v = doc["versions"]
    libs = ", ".join(
        f"{k} {v[k]}" for k in ("driver", "torch", "cuda", "cudnn", "onnxruntime", "tensorrt") if v.get(k) is not None
    )
    t = doc.get("tests", {})
    tests = (
        f"GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
        if "passed" in t
        else f"GPU tests: {t.get('skipped') or t.get('error') or 'not run'}"
    )
    lines = [
        f"**{doc['device']}**{' (dry run on a CPU: plumbing only, not GPU figures)' if doc.get('dry_run') else ''} "
        f"({libs}; {doc['created'][:10]}). {tests}. Pruned: L1, ratio {doc['pruning']['ratio']}, channels in "
        f"multiples of {doc['pruning']['round_to']}. Speed-up = time(original) / time(pruned) with its 95% interval; "
        "the MAC ratio is a static count beside it, not a speed-up.",
        "",
    ]
    rows = doc.get("rows", [])
    batches = sorted({r["batch"] for r in rows})
    body = []
    for key in dict.fromkeys((r["model"], r["backend"], r["precision"]) for r in rows):
        rs = {r["batch"]: r for r in rows if (r["model"], r["backend"], r["precision"]) == key}
        first = next(iter(rs.values()))
        cells = [
            f"{rs[b]['a_ms']:.2f} → {rs[b]['b_ms']:.2f} ms, **{rs[b]['speedup']:.2f}x** "
            f"({rs[b]['ci'][0]:.2f}-{rs[b]['ci'][1]:.2f})"
            if b in rs
            else "-"
            for b in batches
        ]
        body.append([*key, f"{first['mac_ratio']:.3f}", *cells, _settings(first["engine"])])
    if body:
        lines += table(
            [
                "model",
                "backend",
                "precision",
                "MAC ratio",
                *[f"b{b}: original → pruned, speed-up" for b in batches],
                "engine settings as applied",
            ],
            body,
        )
    else:
        lines.append("No original-vs-pruned measurement completed.")
    if doc.get("native"):
        lines += [
            "",
            "Runner overhead: carve's engine against the same torchvision module run natively (same precision, "
            "channels_last, CUDA graphs); 1.00x = no overhead.",
            "",
        ]
        lines.append(bench_native.markdown({"rows": doc["native"], "compile": doc.get("compile", [])}))
    sanity = doc.get("sanity") or {}
    if "eager_over_replayed" in sanity:
        verdict = "ok" if sanity["ok"] else "FAILED: the replayed graph did not beat eager dispatch"
        lines += [
            "",
            f"Timing sanity (ResNet-18 b1): eager / replayed CUDA graph {sanity['eager_over_replayed']:.2f}x, "
            f"{verdict}.",
        ]
    if doc.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(doc["skipped"]) + "."]
    return "\n".join(lines)


def readme(docs: list[dict]) -> str:
    """The README's GPU section: every committed device's document, or the statement that none is measured yet."""
    docs = [d for d in docs if not d.get("dry_run")]
    if not docs:
        return NOT_MEASURED
    return "\n\n".join(markdown(d) for d in docs)


def committed() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((REPO / "benchmarks").glob("gpu_*.json"))]


if __name__ == "__main__":
    sys.exit(main())
