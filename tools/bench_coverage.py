"""Coverage benchmark (issue 22 item 9): what carve does with the models people deploy, as a new user would run it.

At least 24 models across the families people ship (YOLOv8/YOLO11 detection and segmentation, ViT/DeiT, Swin,
ConvNeXt, RegNet/ResNeXt, MobileNetV2/V3/V4, EfficientNet, GhostNet, RepVGG, MobileViT/EfficientViT/FastViT, a
BERT-style encoder, torchvision's DeepLabV3 and SSDLite), each **built from its config with random weights** (nothing
is downloaded: timm ``pretrained=False``, transformers configs, ultralytics yamls, torchvision ``weights=None``).
BatchNorm statistics are re-estimated on random batches first (train mode, cumulative averages) so that activations
are not degenerate. Then, per model:

* **export**: ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch axis) ok or its error;
* **analysis**: the share of MACs in prunable layers (``carve inspect``'s figure) and the top frozen reasons, each
  with the MACs of the layers it freezes and one of carve's own sentences;
* **prune**: ``carve prune --ratio 0.5`` with its defaults (L1, uniform, the backend's channel alignment), the MAC
  ratio, and the verification (max |diff| against the reference) or, for inexact removals (LayerNorm statistics),
  the reported output error;
* **speed**: original against pruned on ONNX Runtime CPU, 1 thread, batch 1, interleaved short rounds (the machinery
  of ``carve bench``), median speed-up with its 95% interval; and the wall time of the whole model.

The models' builders reuse ``tools/bench_transformers.py``'s (ViT/DeiT/Swin/MobileViT/ConvNeXt, HF ViT, BERT,
YOLO11n). Needs the optional ``coverage`` extra (``pip install -e .[coverage]``: timm, transformers, ultralytics,
torchvision); a model whose package is missing is recorded as skipped. Results are written after every model, and
``--models`` reruns only those models, keeping the others' results from the existing file. The machine is shared: the
JSON records the load average before and after, and per model the 1-minute load average when its timing began (timing
holds the sweeps' timing lock, :func:`carve.pipeline.flows.sweep.timing_lock`).

    python tools/bench_coverage.py                          # -> benchmarks/coverage.json
    python tools/bench_coverage.py --models regnety_004 resnext26ts --rounds 5 --markdown
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_transformers import MODELS as TRANSFORMERS
from bench_transformers import export_built, export_error
from benchio import document, speedups, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE = "float"


def _timm(name: str, size: int = 224, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw), ((1, 3, size, size), IMAGE), "timm"

    return build


def _ultralytics(yaml: str, size: int = 640):
    def build():
        from ultralytics.nn.tasks import DetectionModel, SegmentationModel

        cls = SegmentationModel if "-seg" in yaml else DetectionModel
        m = cls(yaml, verbose=False)
        for mod in m.modules():
            if hasattr(mod, "export"):
                mod.export = True
        return m, ((1, 3, size, size), IMAGE), "ultralytics"

    return build


def _torchvision(name: str, size: int = 224, **kw):
    def build():
        import torch
        import torchvision

        if hasattr(torchvision.models.segmentation, name):  # a backbone's weights would be downloaded otherwise
            m = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, **kw)
        else:
            m = getattr(torchvision.models, name)(weights=None, **kw)

        class Plain(torch.nn.Module):  # segmentation models return a dict; export its "out" tensor
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                y = self.inner(x)
                return y["out"] if isinstance(y, dict) else y

        return (Plain(m) if "deeplab" in name else m), ((1, 3, size, size), IMAGE), "torchvision"

    return build


def _ssdlite():
    import torch
    import torchvision

    m = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)

    class Boxes(torch.nn.Module):  # the detector's list-of-dicts output as one tensor per field, batch of one image
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):  # one image (the exported graph's preprocessing splits a batch of exactly one)
            d = self.inner([x[0]])[0]
            return d["boxes"], d["scores"], d["labels"]

        def calibrate(self, x):  # every image of the batch (BatchNorm statistics need more than one)
            self.inner(list(x))

    return Boxes(m), ((1, 3, 320, 320), IMAGE), "torchvision"


MODELS = {
    "yolov8n": _ultralytics("yolov8n.yaml"),
    "yolo11n": TRANSFORMERS["yolo11n"],
    "yolov8n_seg": _ultralytics("yolov8n-seg.yaml"),
    "vit_tiny": TRANSFORMERS["vit_tiny"],
    "deit_tiny": TRANSFORMERS["deit_tiny"],
    "hf_vit_tiny": TRANSFORMERS["hf_vit_tiny"],
    "bert_4l": TRANSFORMERS["bert_4l"],
    "swin_tiny": TRANSFORMERS["swin_tiny"],
    "convnext_atto": TRANSFORMERS["convnext_atto"],
    "regnetx_002": _timm("regnetx_002"),
    "regnety_004": _timm("regnety_004"),
    "resnext26ts": _timm("resnext26ts"),
    "resnet18": _timm("resnet18"),
    "mobilenetv2_tv": _torchvision("mobilenet_v2"),
    "mobilenetv3_small": _timm("mobilenetv3_small_100"),
    "mobilenetv3_large": _timm("mobilenetv3_large_100"),
    "mobilenetv4_small": _timm("mobilenetv4_conv_small"),
    "efficientnet_b0": _timm("efficientnet_b0"),
    "efficientnet_lite0": _timm("efficientnet_lite0"),
    "ghostnet_100": _timm("ghostnet_100"),
    "repvgg_a0": _timm("repvgg_a0"),
    "mobilevit_xxs": TRANSFORMERS["mobilevit_xxs"],
    "efficientvit_b0": _timm("efficientvit_b0"),
    "fastvit_t8": _timm("fastvit_t8"),
    "deeplabv3_mnv3": _torchvision("deeplabv3_mobilenet_v3_large", 256, num_classes=21),
    "ssdlite320": _ssdlite,
}

# models with grouped (not depthwise) convs: also pruned by equal widths in every group (``conv_groups="width"``)
GROUPED = {"regnetx_002", "regnety_004", "resnext26ts", "efficientvit_b0"}


def reestimate_bn(m, spec, batches: int = 3, batch: int = 4) -> bool:
    """Re-estimate BatchNorm running statistics on random batches (cumulative average): random weights with the
    default statistics give activations that explode or vanish. The model runs in eval mode with only its BatchNorms
    in training mode, so detectors that want targets in training mode run too. Returns whether it has BatchNorm."""
    import torch

    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or spec[1] != IMAGE:
        return False
    m.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for _ in range(batches):
            getattr(m, "calibrate", m)(torch.randn(batch, *spec[0][1:]))
    m.eval()
    return True


def frozen_by_macs(model, an) -> dict[str, dict]:
    """The frozen reasons, each with the MACs of the layers it freezes (their first reason) and one example."""
    from carve.pipeline.graph.channels import reason_kind
    from carve.pipeline.graph.overview import overview

    rows = overview(model, an)
    total = rows["summary"]["macs"] or 1
    out: dict[str, dict] = defaultdict(lambda: {"macs_share": 0.0, "layers": 0, "example": ""})
    for layer in rows["layers"]:
        if layer["status"] == "prunable" or not layer["reason"]:
            continue
        r = out[reason_kind(layer["reason"])]
        r["macs_share"] += layer["macs"] / total
        r["layers"] += 1
        r["example"] = r["example"] or layer["reason"][:160]
    top = sorted(out.items(), key=lambda kv: -kv[1]["macs_share"])[:3]
    return {k: {**v, "macs_share": round(v["macs_share"], 4)} for k, v in top}


def timed(a: Path, b: Path, rounds: int) -> dict:
    """B's speed-up over A (batch 1, 1 thread, the thread's CPU clock) under the sweeps' timing lock, so that no
    carve sweep on this machine times at the same moment; with the 1-minute load average when timing began."""
    from carve.pipeline.flows.sweep import timing_lock

    with timing_lock():
        load = round(os.getloadavg()[0], 2)
        return {**speedups(a, b, [1], rounds, clock="cpu")["1"], "load_average": load}


def run_one(name: str, tmp: Path, rounds: int) -> dict:
    import torch

    from carve.pipeline.flows.prune import prune_measured
    from carve.pipeline.graph import load, save
    from carve.pipeline.graph.channels import analyse
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.graph.overview import prunable_macs
    from carve.pipeline.pruning.prune import PruneOptions

    started = time.time()
    src = tmp / f"{name}.onnx"
    torch.manual_seed(0)
    m, spec, source = MODELS[name]()
    out: dict = {"source": source, "exporter": "torchscript, opset 17", "bn_reestimated": reestimate_bn(m, spec)}
    try:
        export_built(m, spec, source, src)
    except Exception as exc:  # an exporter failure is a result here
        out.update(export=f"failed: {export_error(exc)}", seconds=round(time.time() - started, 1))
        return out
    out["export"] = "ok"
    model = load(src)
    an = analyse(model)
    cost = model_cost(model)
    out.update(
        macs=cost.macs,
        params=cost.params,
        macs_prunable_share=round(prunable_macs(an, cost) / cost.macs, 4),
        channels_prunable_share=round(an.summary()["prunable_fraction"], 4),
        frozen=frozen_by_macs(model, an),
    )
    try:
        report = prune_measured(load(src), PruneOptions(ratio=0.5, measure=False), inplace=True)
    except Exception as exc:  # a refusal is a result: carve's own sentence
        out.update(prune=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        out["seconds"] = round(time.time() - started, 1)
        return out
    dst = tmp / f"{name}_pruned.onnx"
    save(report.model, dst)
    out.update(
        prune="ok",
        mac_ratio=round(report.macs_ratio, 4),
        param_ratio=round(report.params_ratio, 4),
        verify_max_abs=report.verify.max_abs_diff,
        verify_scale=report.verify.scale,
    )
    if report.inexact is not None:
        ix = report.inexact
        out["inexact"] = {"units": ix.units, "groups": ix.groups, **(ix.error or {})}
    out["speed"] = timed(src, dst, rounds)
    if name in GROUPED:  # the other way to prune a grouped conv: equal widths in every group
        width = prune_measured(load(src), PruneOptions(ratio=0.5, conv_groups="width", measure=False), inplace=True)
        save(width.model, dst)
        out["equal_widths"] = {
            "mac_ratio": round(width.macs_ratio, 4),
            "verify_max_abs": width.verify.max_abs_diff,
            "speed": timed(src, dst, rounds),
        }
    out["seconds"] = round(time.time() - started, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds per pair")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "coverage.json"))
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    args = ap.parse_args(argv)
    out = Path(args.output)
    kept = json.loads(out.read_text())["models"] if out.exists() and set(args.models) != set(MODELS) else {}
    started = time.time()
    load_before = os.getloadavg()
    results = dict(kept)

    def save(show: bool = False) -> None:
        doc = document(
            "coverage",
            started,
            settings={
                "ratio": 0.5,
                "criterion": "l1",
                "allocator": "uniform",
                "engine": "ort cpu fp32, 1 thread, batch 1",
                "clock": "thread CPU time (carve bench --clock cpu)",
                "rounds": args.rounds,
                "weights": "random, built from configs; BatchNorm statistics re-estimated on random batches",
            },
            load_average={
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in os.getloadavg()],
            },
            models={k: results[k] for k in MODELS if k in results},
        )
        write(doc, out, markdown, show)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                results[name] = run_one(name, Path(tmp), args.rounds)
            except ModuleNotFoundError as exc:
                results[name] = {"skipped": f"{exc.name} is not installed (pip install {exc.name})"}
            print(name, json.dumps(results[name]), flush=True)
            save()
    save(args.markdown)


def _pct(x) -> str:
    return f"{x:.0%}" if isinstance(x, float) else "-"


def markdown(doc: dict) -> str:
    rows = []
    for name, r in doc["models"].items():
        if "skipped" in r or r.get("export") != "ok":
            rows.append([name, r.get("source", ""), r.get("skipped") or r.get("export"), "", "", "", "", "", ""])
            continue
        frozen = "; ".join(f"{k} ({v['macs_share']:.0%})" for k, v in r["frozen"].items()) or "-"
        if r.get("prune") != "ok":
            rows.append([name, r["source"], "ok", _pct(r["macs_prunable_share"]), frozen, r["prune"], "", "", ""])
            continue
        sp = r["speed"]
        ix = r.get("inexact")
        err = f"inexact: {ix['max_rel']:.1%} rel." if ix else f"exact, {r['verify_max_abs']:.0e}"
        speed = f"{sp['speedup']:.2f}x ({sp['ci'][0]:.2f}-{sp['ci'][1]:.2f})"
        ratio = f"{r['mac_ratio']:.3f}"
        if "equal_widths" in r:
            wg = r["equal_widths"]
            ratio += f"; equal widths {wg['mac_ratio']:.3f}"
            speed += f"; equal widths {wg['speed']['speedup']:.2f}x"
        rows.append(
            [
                name,
                r["source"],
                "ok",
                _pct(r["macs_prunable_share"]),
                frozen,
                ratio,
                speed,
                err,
                f"{r['seconds']:.0f}",
            ]
        )
    env = doc["environment"]
    lines = table(
        [
            "model",
            "source",
            "export",
            "MACs prunable",
            "top frozen reasons (share of MACs)",
            "MAC ratio at 0.5",
            "speed-up (95% CI)",
            "verified |diff| / reported error",
            "time (s)",
        ],
        rows,
    )
    la = doc.get("load_average", {})
    timed_at = [r["speed"]["load_average"] for r in doc["models"].values() if "load_average" in r.get("speed", {})]
    during = f", {min(timed_at)}-{max(timed_at)} while timing" if timed_at else ""
    lines.append("")
    lines.append(
        f"{len(doc['models'])} models, random weights built from configs (BatchNorm statistics re-estimated on random "
        f"batches), TorchScript exporter (opset 17); `carve prune --ratio 0.5` defaults; ORT CPU, 1 thread, batch 1, "
        f"{doc['settings']['rounds']} interleaved rounds timed by the thread's CPU time on {env.get('cpu', '?')}; "
        f"load average {la.get('before', ['?'])[0]} before, {la.get('after', ['?'])[0]} after{during} "
        "(shared machine). "
        "Reported error of an inexact (LayerNorm) removal: the output's max relative distance to the original with the "
        "removed channels zeroed, before any repair. Grouped convs are pruned by whole groups (the default); "
        "'equal widths': `--conv-groups width`, measured in the same run."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
