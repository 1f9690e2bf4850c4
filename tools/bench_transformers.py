"""Benchmark transformers and the other models of issue 22 items 1-3: how much carve can prune, how fast the result
is, and how far an inexact removal moves the output.

Every model is built from its config with random weights (nothing is downloaded: timm ``pretrained=False``,
transformers ``from_config``-style constructors, ultralytics from its yaml), exported with ``torch.onnx.export``
(TorchScript exporter, opset 17, dynamic batch axis), then:

* **analysed**: the share of MACs in prunable layers (``carve inspect``'s figure: layers whose output channels may be
  removed, plus attention products over prunable channels), prunable channels, LayerNorm-normalised (inexact) groups;
* **pruned** with ``carve prune --ratio 0.5`` and its defaults (L1, uniform, the backend's channel alignment,
  ``--attention heads``; ViT-tiny also ``--attention width``), verified in ONNX Runtime against the masked reference,
  and the output error of the inexact removal against the plain reference recorded;
* **measured**: original against pruned on ONNX Runtime CPU, 1 thread, batch 1, interleaved rounds (the machinery of
  ``carve bench``), median speed-up with its 95% interval;
* **the dynamo exporter** (``torch.onnx.export(..., dynamo=True)``, opset 18): the same model exported again,
  analysed and pruned at 0.5 (verified), not timed; an export that fails is recorded with its error.

Needs the optional packages (``pip install timm transformers ultralytics``); a model whose package is missing is
recorded as skipped. The machine is shared: the JSON records the load average before and after.

    python tools/bench_transformers.py                   # -> benchmarks/transformers.json
    python tools/bench_transformers.py --models vit_tiny --rounds 9 --markdown
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchio import document, speedups, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timm(name: str, size: int = 224, **kw):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw), ((1, 3, size, size), "float"), "timm"

    return build


def _bert():
    import transformers as tr

    cfg = tr.BertConfig(
        vocab_size=30522,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
        num_labels=2,
    )
    m = tr.BertForSequenceClassification(cfg)
    return m, (((1, 128), "ids"), ((1, 128), "mask")), "transformers"


def _hf_vit():
    import transformers as tr

    cfg = tr.ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )
    return tr.ViTForImageClassification(cfg), ((1, 3, 224, 224), "float"), "transformers"


def _yolo11n():
    from ultralytics.nn.tasks import DetectionModel

    m = DetectionModel("yolo11n.yaml", verbose=False)
    for mod in m.modules():
        if hasattr(mod, "export"):
            mod.export = True
    return m, ((1, 3, 640, 640), "float"), "ultralytics"


MODELS = {
    "vit_tiny": _timm("vit_tiny_patch16_224"),
    "deit_tiny": _timm("deit_tiny_patch16_224"),
    "swin_tiny": _timm("swin_tiny_patch4_window7_224"),
    "mobilevit_xxs": _timm("mobilevit_xxs", 256),
    "convnext_atto": _timm("convnext_atto"),
    "hf_vit_tiny": _hf_vit,
    "bert_4l": _bert,
    "yolo11n": _yolo11n,
}
PACKAGES = {"transformers": "transformers", "ultralytics": "ultralytics", "timm": "timm"}


def export(name: str, path: Path, exporter: str = "torchscript") -> str:
    import torch

    torch.manual_seed(0)
    m, spec, source = MODELS[name]()
    return export_built(m, spec, source, path, exporter)


def export_built(m, spec, source: str, path: Path, exporter: str = "torchscript") -> str:
    """Export a built model (a builder's ``(module, input spec, source)``) to ``path``; returns the source."""
    import onnx
    import torch

    m.eval()
    if spec[0][1] == "ids":
        args = (torch.randint(0, 30522, spec[0][0]), torch.ones(spec[1][0], dtype=torch.long))
        names = ["input_ids", "attention_mask"]
    else:
        args, names = (torch.randn(*spec[0]),), ["input"]
    if source == "ultralytics":
        m(*args)  # builds the head's anchors for this input size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", max=64)
            shapes = tuple({0: batch} for _ in args)
            ep = torch.onnx.export(m, args, dynamo=True, opset_version=18, verbose=False, dynamic_shapes=shapes)
            onnx.save(ep.model_proto, str(path))
            return source
        torch.onnx.export(
            m,
            args,
            str(path),
            opset_version=17,
            dynamo=False,
            input_names=names,
            output_names=["y"],
            dynamic_axes={**{n: {0: "batch"} for n in names}, "y": {0: "batch"}},
        )
    return source


def export_error(exc: Exception) -> str:
    """The line of an exporter's error that says what went wrong (torch.export puts it under "Exception summary")."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    if "## Exception summary" in lines and lines.index("## Exception summary") + 1 < len(lines):
        return lines[lines.index("## Exception summary") + 1][:200]
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def run_dynamo(name: str, tmp: Path) -> dict:
    """The dynamo exporter's graph of the same model: analysed and pruned at 0.5 (verified), not timed."""
    from carve.pipeline.graph import load
    from carve.pipeline.graph.channels import analyse
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.graph.overview import prunable_macs
    from carve.pipeline.pruning.prune import PruneOptions, prune_model

    src = tmp / f"{name}_dynamo.onnx"
    try:
        export(name, src, "dynamo")
    except Exception as exc:  # an exporter failure is a result here, recorded as such
        return {"export": f"failed: {export_error(exc)}"}
    model = load(src)
    an = analyse(model)
    report = prune_model(model, PruneOptions(ratio=0.5, measure=False))
    return {
        "export": "ok, opset 18",
        "macs_prunable_share": round(prunable_macs(an) / model_cost(model).macs, 4),
        "mac_ratio": round(report.macs_ratio, 4),
        "verify_max_abs": report.verify.max_abs_diff,
    }


def run_one(name: str, tmp: Path, rounds: int) -> dict:
    from carve.pipeline.flows.prune import prune_measured
    from carve.pipeline.graph import load, save
    from carve.pipeline.graph.channels import analyse, reason_kind
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.graph.overview import prunable_macs
    from carve.pipeline.pruning.prune import PruneOptions

    src = tmp / f"{name}.onnx"
    t0 = time.time()
    source = export(name, src)
    out: dict = {"source": source, "exporter": "torchscript, opset 17", "export_s": round(time.time() - t0, 1)}
    model = load(src)
    t0 = time.time()
    an = analyse(model)
    out["analyse_s"] = round(time.time() - t0, 2)
    cost = model_cost(model)
    s = an.summary()
    frozen: dict[str, int] = {}
    for rs in an.unit_reasons.values():
        frozen[reason_kind(rs[0])] = frozen.get(reason_kind(rs[0]), 0) + 1
    out.update(
        macs=cost.macs,
        params=cost.params,
        macs_prunable_share=round(prunable_macs(an, cost) / cost.macs, 4),
        channels_prunable_share=round(s["prunable_fraction"], 4),
        inexact_groups=s["inexact_groups"],
        frozen=dict(sorted(frozen.items(), key=lambda kv: -kv[1])[:3]),
        runs={},
    )
    modes = ["heads", "width"] if name in ("vit_tiny", "bert_4l") else ["heads"]
    for mode in modes:
        t0 = time.time()
        m = load(src)
        report = prune_measured(m, PruneOptions(ratio=0.5, attention=mode, measure=False), inplace=True)
        dst = tmp / f"{name}_{mode}.onnx"
        save(report.model, dst)
        run = {
            "prune_s": round(time.time() - t0, 1),
            "round_to": report.round_to,
            "mac_ratio": round(report.macs_ratio, 4),
            "param_ratio": round(report.params_ratio, 4),
            "verify_max_abs": report.verify.max_abs_diff,
            "verify_scale": report.verify.scale,
            "verify_reference": report.verify.reference,
        }
        if report.inexact is not None:
            ix = report.inexact
            run["inexact"] = {"units": ix.units, "groups": ix.groups, **(ix.error or {})}
        run["speed"] = speedups(src, dst, [1], rounds)["1"]
        out["runs"][mode] = run
    out["dynamo"] = run_dynamo(name, tmp)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per pair")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "transformers.json"))
    ap.add_argument("--markdown", action="store_true", help="also print the README table")
    args = ap.parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                results[name] = run_one(name, Path(tmp), args.rounds)
            except ModuleNotFoundError as exc:
                results[name] = {"skipped": f"{exc.name} is not installed (pip install {exc.name})"}
            print(name, results[name], flush=True)
    doc = document(
        "transformers",
        started,
        settings={
            "ratio": 0.5,
            "criterion": "l1",
            "allocator": "uniform",
            "engine": "ort cpu fp32, 1 thread, batch 1",
            "rounds": args.rounds,
        },
        load_average={"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        models=results,
    )
    write(doc, args.output, markdown, args.markdown)


def markdown(doc: dict) -> str:
    rows = []
    for name, r in doc["models"].items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"], "", "", "", "", "", ""])
            continue
        dy = r.get("dynamo", {})
        dyn = (
            f"{dy['macs_prunable_share']:.1%}, MAC ratio {dy['mac_ratio']:.3f}"
            if "mac_ratio" in dy
            else dy.get("export", "not run")
        )
        for mode, run in r["runs"].items():
            sp = run["speed"]
            ix = run.get("inexact")
            err = f"{ix['max_rel']:.1%} (cos {ix['cosine']:.3f})" if ix else "exact"
            rows.append(
                [
                    name if mode == "heads" else f"{name} (width)",
                    f"{r['macs_prunable_share']:.1%}",
                    f"{r['channels_prunable_share']:.1%}",
                    f"{run['mac_ratio']:.3f}",
                    f"{sp['speedup']:.2f}x ({sp['ci'][0]:.2f}-{sp['ci'][1]:.2f})",
                    f"{run['verify_max_abs']:.1e}",
                    err,
                    dyn if mode == "heads" else "",
                ]
            )
    env = doc["environment"]
    lines = table(
        [
            "model",
            "MACs prunable",
            "channels prunable",
            "MAC ratio at 0.5",
            "speed-up (95% CI)",
            "verified |diff|",
            "inexact error (LayerNorm)",
            "dynamo export: MACs prunable, MAC ratio",
        ],
        rows,
    )
    la = doc.get("load_average", {})
    lines.append("")
    lines.append(
        f"ORT CPU, 1 thread, batch 1, {doc['settings']['rounds']} interleaved rounds on {env.get('cpu', '?')}; "
        f"load average {la.get('before', ['?'])[0]} before, {la.get('after', ['?'])[0]} after (shared machine). "
        "Verified: the pruned model equals the original with the removed channels zeroed and LayerNorm statistics "
        "over the kept channels (max |diff|); inexact error: the output's distance (max relative, cosine) to the "
        "original with the removed channels zeroed but statistics over every channel, before any repair. Columns 2-7: "
        "the TorchScript exporter (opset 17); the last: the dynamo exporter (opset 18), pruned and verified, not timed."
    )
    for name, r in doc["models"].items():
        if "separate_run" in r:  # a row merged from another run of this script
            run = r["separate_run"]
            lines += [
                "",
                f"{name}: from a separate run ({run['command']}; load average {run['load_average']}; {run['why']}).",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
