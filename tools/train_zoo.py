"""Train the zoo models whose weights are not shipped, into the cache (``$CARVE_CACHE``, default ~/.cache/carve), where
``carve export NAME`` (weights auto) finds them:

    python tools/train_zoo.py vit           # ViT on ../shared/data/cifar10 (10,000 training images), a few CPU-minutes
    python tools/train_zoo.py detector      # the detector on carve's synthetic digit-detection set
    python tools/train_zoo.py vit --fresh   # retrain even when cached
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_map(model) -> dict:
    """The trained detector's mAP on ``detect-digits:test``, measured on its ONNX export exactly as ``carve eval``
    measures it."""
    import tempfile

    from carve import models
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load
    from carve.pipeline.measure.detection import evaluate_detection

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state.pt"
        import torch

        torch.save(model.state_dict(), path)
        onnx_path = models.export("detector", Path(d) / "det.onnx", weights=str(path)).path
        m = load(onnx_path)
        result = evaluate_detection(m, load_data("detect-digits:test", model=m))
    return {"test_map50": result["map50"], "test_map50_95": result["map50_95"]}


def main(argv: list[str] | None = None) -> int:
    from carve.models import train, train_detector

    trainers = {"vit": train.vit_cifar10, "detector": lambda **kw: train_detector.detector_digits(score=test_map, **kw)}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", choices=sorted(trainers))
    ap.add_argument("--fresh", action="store_true", help="train again even when the cache holds weights")
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (the cache then holds this run)")
    args = ap.parse_args(argv)
    for name in args.names:
        t0 = time.perf_counter()
        extra = {"epochs": args.epochs} if args.epochs else {}
        log = lambda line, n=name, t0=t0: print(f"{n}: {line} ({time.perf_counter() - t0:.0f} s)", flush=True)  # noqa: E731
        _, metrics = trainers[name](use_cache=not args.fresh, log=log, **extra)
        print(f"{name}: {metrics}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
