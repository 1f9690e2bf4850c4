"""Benchmark engines: every zoo model against its uniformly pruned version, side by side.

For each model: export (trained weights where available), prune with L1 at ``--ratio`` (round-to ``--round-to``),
then ``carve.pipeline.measure.compare`` on the chosen backend for every (threads, batch) pair: interleaved rounds,
speed-up with a 95% bootstrap interval, MAC ratio and efficiency, fresh-process memory. An alignment study prunes
MobileNetV2 and ResNet-50 at ratio 0.3 with round-to 1, 8 and 16, because channel widths decide which kernels run.

    python tools/bench_backends.py                                   # ORT CPU -> benchmarks/backends.json
    python tools/bench_backends.py --backend torch-cuda --threads 1 --batch 1,32 -o benchmarks/backends_gpu.json
    python tools/bench_backends.py --pairs a.onnx:b.onnx ...         # existing pairs instead of the zoo
    python tools/bench_backends.py --markdown
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


def prune_copy(src: Path, dst: Path, ratio: float, round_to: int) -> None:
    from carve import Widths, analyse, load, plan, prune, save

    m = load(src)
    save(prune(m, plan(analyse(m), ratio, scores="l1", widths=Widths(round_to=round_to)), inplace=True), dst)


def measure(a: Path, b: Path, args, batches: list[int], threads: list[int]) -> dict:
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    cfg = MeasureConfig(
        backend=args.backend,
        device=args.device,
        batch=batches,
        threads=threads,
        rounds=args.rounds,
        min_round_ms=args.min_round_ms,
        agreement=False,
        memory=not args.no_memory,
        precision=args.precision,
    )
    r = compare(a, b, cfg)
    for res in r["results"]:  # keep the JSON small: drop raw samples, keep the statistics and round ratios
        for k in ("a", "b"):
            res[k].pop("samples_ms", None)
    return r


def row(name: str, res: dict, mem: dict | None) -> dict:
    s = res["speedup"]
    out = {
        "model": name,
        "batch": res["batch"],
        "threads": res["threads"],
        "a_ms": res["a"]["median_ms"],
        "b_ms": res["b"]["median_ms"],
        "speedup": s["median"],
        "ci": [s["ci_low"], s["ci_high"]],
        "mac_ratio": res["mac_ratio"],
        "efficiency": res.get("speedup_efficiency"),
        "a_cv": res["a"]["cv"],
        "b_cv": res["b"]["cv"],
    }
    if mem:
        a = mem["a"].get(str(res["batch"]), {})
        b = mem["b"].get(str(res["batch"]), {})
        if "peak_rss_bytes" in a and "peak_rss_bytes" in b:
            out["peak_mb"] = [a["peak_rss_bytes"] / 2**20, b["peak_rss_bytes"] / 2**20]
    return out


def main() -> None:
    import carve.models as zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--pairs", nargs="*", help="A.onnx:B.onnx pairs to measure instead of the zoo")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--min-round-ms", type=float, default=100)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-alignment", action="store_true")
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "backends.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    threads = [int(x) for x in args.threads.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    rows, alignment = [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.pairs:
            pairs = [(Path(p.split(":")[0]), Path(p.split(":")[1]), Path(p.split(":")[1]).stem) for p in args.pairs]
        else:
            pairs = []
            for name in args.models or zoo.available():
                a, b = tmp / f"{name}.onnx", tmp / f"{name}_p.onnx"
                zoo.export(name, a)
                prune_copy(a, b, args.ratio, args.round_to)
                pairs.append((a, b, name))
        for a, b, name in pairs:
            r = measure(a, b, args, batches, threads)
            for res in r["results"]:
                rows.append(row(name, res, r.get("memory")))
                x = rows[-1]
                print(
                    f"{name:20s} b{x['batch']} t{x['threads']}  {x['a_ms']:8.3f} -> {x['b_ms']:8.3f} ms  "
                    f"{x['speedup']:.2f}x [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]  MACs {x['mac_ratio']:.3f}  "
                    f"eff {x['efficiency']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        if not args.pairs and not args.no_alignment:
            for name in ("mobilenet_v2", "resnet50"):
                a = tmp / f"{name}.onnx"
                if not a.exists():
                    zoo.export(name, a)
                for rt in (1, 8, 16):
                    b = tmp / f"{name}_rt{rt}.onnx"
                    prune_copy(a, b, 0.3, rt)
                    r = measure(a, b, argparse.Namespace(**{**vars(args), "no_memory": True}), [1], [1])
                    x = row(name, r["results"][0], None)
                    x["round_to"] = rt
                    alignment.append(x)
                    print(
                        f"alignment {name} round-to {rt}: {x['speedup']:.2f}x eff {x['efficiency']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
    doc = document(
        "backends",
        t0,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        pruning={"criterion": "l1", "ratio": args.ratio, "round_to": args.round_to},
        method=f"interleaved rounds ({args.rounds} x >= {args.min_round_ms} ms per model), speed-up = median "
        "of per-round time(A)/time(B) with a 95% bootstrap CI; efficiency = speed-up x MAC ratio",
        rows=rows,
        alignment=alignment,
    )
    write(doc, args.output, markdown, args.markdown)


def markdown(doc: dict) -> str:
    """One row per model: speed-up (95% CI) per (batch, threads), efficiency range, peak RSS at the largest batch."""
    configs = sorted({(r["batch"], r["threads"]) for r in doc["rows"]})
    rows = []
    for model in dict.fromkeys(r["model"] for r in doc["rows"]):
        rs = {(r["batch"], r["threads"]): r for r in doc["rows"] if r["model"] == model}
        first, last = rs[configs[0]], rs[configs[-1]]
        eff = [r["efficiency"] for r in rs.values()]
        mem = f"{last['peak_mb'][0]:.0f} → {last['peak_mb'][1]:.0f}" if "peak_mb" in last else "-"
        rows.append(
            [model, f"{first['a_ms']:.2f}", f"{first['mac_ratio']:.3f}"]
            + [f"{rs[c]['speedup']:.2f}x ({rs[c]['ci'][0]:.2f}-{rs[c]['ci'][1]:.2f})" for c in configs]
            + [f"{min(eff):.2f}-{max(eff):.2f}", mem]
        )
    lines = table(
        ["model", "original ms (b1, 1 thread)", "MAC ratio"]
        + [f"speed-up b{b} t{t}" for b, t in configs]
        + ["efficiency", "peak RSS MB (original → pruned)"],
        rows,
    )
    if doc.get("alignment"):
        header = ["model (ratio 0.3, batch 1, 1 thread)", "round-to", "speed-up (95% CI)", "MAC ratio", "efficiency"]
        lines += [""] + table(
            header,
            [
                [
                    r["model"],
                    r["round_to"],
                    f"{r['speedup']:.2f}x ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})",
                    f"{r['mac_ratio']:.3f}",
                    f"{r['efficiency']:.2f}",
                ]
                for r in doc["alignment"]
            ],
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
