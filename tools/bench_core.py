"""Benchmark the core: load -> analyse -> plan -> prune -> save for every zoo model.

Each model is exported once (weights "auto", real input sizes), then measured in a fresh process per repetition:
wall time of each stage (the Python API, imports excluded), peak resident memory above the process's baseline after
imports (VmHWM - VmRSS), and what the analysis finds (prunable vs frozen channels, groups, frozen reasons).

    python tools/bench_core.py                     # all zoo models -> benchmarks/core.json
    python tools/bench_core.py --models resnet50 --repeat 5
    python tools/bench_core.py --markdown          # also print the README table
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchio import document, table, write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import carve.pipeline.graph.channels, carve.pipeline.graph.surgery, carve.pipeline.pruning.planner
import carve.plugins.criteria, carve.plugins.allocators
from carve import Widths, load, analyse, plan, prune, save
base = rss("VmRSS:")
t = [time.perf_counter()]
m = load(sys.argv[1]); t.append(time.perf_counter())
a = analyse(m); t.append(time.perf_counter())
p = plan(a, 0.5, scores="l1", widths=Widths(round_to=8)); t.append(time.perf_counter())
q = prune(m, p, inplace=True); t.append(time.perf_counter())
save(q, sys.argv[2]); t.append(time.perf_counter())
s = a.summary()
print(json.dumps({"stages": dict(zip(["load", "analyse", "plan", "prune", "save"], [b - a for a, b in zip(t, t[1:])])),
                  "total": t[-1] - t[0], "peak_extra_bytes": rss("VmHWM:") - base, "summary": s}))
"""


def run(models: list[str], repeat: int) -> dict:
    import carve.models as zoo
    from carve.pipeline.graph import load
    from carve.pipeline.graph.cost import model_cost

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            src = Path(tmp) / f"{name}.onnx"
            info = zoo.export(name, src)
            runs = []
            for _ in range(repeat):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / f"{name}_p.onnx")],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=REPO,
                )
                runs.append(json.loads(out.stdout))
            c0, c1 = model_cost(load(src)), model_cost(load(Path(tmp) / f"{name}_p.onnx"))
            s = runs[0]["summary"]
            results[name] = {
                "input": list(info.input_shape),
                "weights": info.weights,
                "onnx_bytes": src.stat().st_size,
                "total_s": statistics.median(r["total"] for r in runs),
                "stages_s": {k: statistics.median(r["stages"][k] for r in runs) for k in runs[0]["stages"]},
                "peak_extra_mb": statistics.median(r["peak_extra_bytes"] for r in runs) / 2**20,
                "channels": s["channels"],
                "prunable_channels": s["prunable_channels"],
                "prunable_fraction": s["prunable_fraction"],
                "groups": s["groups"],
                "units": s["units"],
                "frozen_reasons": s["frozen_reasons"],
                "params": [c0.params, c1.params],
                "macs": [c0.macs, c1.macs],
            }
            r = results[name]
            print(
                f"{name:20s} {r['total_s']:.3f}s  peak +{r['peak_extra_mb']:.0f} MB  "
                f"prunable {r['prunable_fraction']:.1%}",
                file=sys.stderr,
            )
    return results


def markdown(doc: dict) -> str:
    header = [
        "model",
        "input",
        "load→analyse→prune→save",
        "analyse",
        "peak memory",
        "prunable channels",
        "groups",
        "frozen because",
        "MACs after ratio 0.5",
    ]
    rows = [
        [
            name,
            "x".join(map(str, r["input"][1:])),
            f"{r['total_s'] * 1000:.0f} ms",
            f"{r['stages_s']['analyse'] * 1000:.0f} ms",
            f"+{r['peak_extra_mb']:.0f} MB",
            f"{r['prunable_channels']}/{r['channels']} ({r['prunable_fraction']:.1%})",
            r["groups"],
            ", ".join(f"{k} ({v})" for k, v in r["frozen_reasons"].items()),
            f"{r['macs'][1] / r['macs'][0]:.1%}",
        ]
        for name, r in doc["models"].items()
    ]
    return "\n".join(table(header, rows))


def main() -> None:
    import carve.models as zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "core.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    names = args.models or zoo.available()
    started = time.time()
    models = run(names, args.repeat)
    doc = document(
        "core",
        started,
        what="load -> analyse -> plan(l1, ratio 0.5, round-to 8) -> prune -> save, median of fresh processes",
        repeat=args.repeat,
        models=models,
    )
    write(doc, args.output, markdown, args.markdown)


if __name__ == "__main__":
    main()
