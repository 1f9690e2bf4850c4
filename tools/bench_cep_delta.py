"""CEP's gradient-free variant (``cep`` ``variant=delta``) against Taylor CEP and L1, no repair.

LeNet-5 on digits (calibration: 256 training digits; evaluation: the held-out digits) and, when ../shared is present,
the trained CIFAR ResNet-20 (calibration: 256 images of ``train_subset.npz``; evaluation: 2,000 images of ``test.npz``).
The delta variant measures the loss on 128 of the calibration images per removed unit. Reports top-1 at 75% and 50%
of the original MACs and the scoring wall time; ResNet-56 is left out (about 20 minutes of scoring).

    python tools/bench_cep_delta.py --markdown      # -> benchmarks/cep_delta.json
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

VARIANTS = [("l1", {}), ("cep", {}), ("cep", {"variant": "delta", "samples": 128})]


def main() -> None:
    from carve import analyse, load, models, prune
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.data.shared import shared_file
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.pruning.planner import plan, score
    from carve.pipeline.pruning.targets import Target

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="*", type=float, default=[0.75, 0.5])
    ap.add_argument("-o", "--output", default=str(REPO / "benchmarks" / "cep_delta.json"))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    started = time.time()
    setups = [("lenet5", "digits:train", "digits:test", None)]
    train, test = shared_file("data", "cifar10", "train_subset.npz"), shared_file("data", "cifar10", "test.npz")
    if train and test and models.has_trained_weights("resnet20"):
        setups.append(("resnet20", str(train), str(test), 2000))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, calib_src, eval_src, n in setups:
            path = Path(tmp) / f"{name}.onnx"
            models.export(name, path)
            m = load(path)
            calib = load_data(calib_src, model=m, samples=256, seed=0)
            evalset = load_data(eval_src, model=m, samples=n, seed=1)
            an = analyse(m)
            base = evaluate(m, evalset)["top1"]
            for crit, opts in VARIANTS:
                t0 = time.perf_counter()
                scores = score(an, crit, calib=calib, options=opts)
                seconds = time.perf_counter() - t0
                top1 = {
                    str(t): evaluate(prune(m, plan(an, Target("macs", t), scores=scores)), evalset)["top1"]
                    for t in args.targets
                }
                label = crit + ("[delta]" if opts.get("variant") == "delta" else "")
                rows.append(
                    {
                        "model": name,
                        "criterion": label,
                        "original_top1": base,
                        "eval_samples": len(evalset),
                        "score_seconds": seconds,
                        "top1": top1,
                    }
                )
                print(name, label, top1, f"{seconds:.1f}s", file=sys.stderr, flush=True)
    doc = document("cep_delta", started, targets=args.targets, rows=rows)
    write(doc, args.output, markdown, args.markdown)


def markdown(doc: dict) -> str:
    targets = [str(t) for t in doc["targets"]]
    rows = [
        [f"{r['model']} ({r['original_top1']:.1%}, {r['eval_samples']} images)", r["criterion"]]
        + [f"{r['top1'][t]:.1%}" for t in targets]
        + [f"{r['score_seconds']:.1f} s"]
        for r in doc["rows"]
    ]
    header = ["model (original top-1)", "criterion"] + [f"top-1 at MACs {t}" for t in targets] + ["scoring"]
    return "\n".join(table(header, rows))


if __name__ == "__main__":
    main()
