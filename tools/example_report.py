"""Produce the README's example report with the CLI, exactly as a user would run it.

In a scratch directory: export the trained CIFAR ResNet-20, prune it to half its MACs (L1, round-to 8) with the
least-squares repair on 256 training images, ``carve eval`` both on the CIFAR-10 test set, ``carve bench`` the pair on
ONNX Runtime CPU (1 and 2 threads, batch 1 and 8, agreement on real test images), and merge the reports into
``benchmarks/example_report.json`` with the plots in ``docs/img/``. ``tools/update_readme.py`` renders the JSON into
the README with ``carve report``'s renderer.

    python tools/example_report.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    from carve.pipeline.cli import main as carve
    from carve.pipeline.data.shared import missing_reason, shared_dir, shared_file
    from carve.pipeline.measure.report import load_report, merge, plots

    test = shared_file("data", "cifar10", "test.npz")
    if test is None:
        sys.exit(f"example_report needs the CIFAR-10 test set: {missing_reason('data', 'cifar10')}")
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            os.symlink(shared_dir(), "shared")  # so the recorded commands read as a user would type them
            data = "shared/data/cifar10"
            steps = [
                ["export", "resnet20", "-o", "r20.onnx"],
                [
                    "prune",
                    "r20.onnx",
                    "-o",
                    "r20_p.onnx",
                    "--criterion",
                    "l1",
                    "--target-macs",
                    "0.5",
                    "--round-to",
                    "8",
                ]
                + ["--fuse", "lsq", "--calib", f"{data}/train_subset.npz", "--samples", "256"],
                ["eval", "r20.onnx", "--data", f"{data}/test.npz", "-o", "eval_a.json"],
                ["eval", "r20_p.onnx", "--data", f"{data}/test.npz", "--reference", "r20.onnx", "-o", "eval_b.json"],
                ["bench", "r20.onnx", "r20_p.onnx", "--threads", "1,2", "--batch", "1,8", "--data", f"{data}/test.npz"]
                + ["-o", "report.json"],
            ]
            for args in steps:
                sys.argv = ["carve", *args]  # the reports record the command line as typed
                if carve(args) != 0:
                    sys.exit(f"carve {' '.join(args)} failed")
            doc = merge([load_report(f) for f in ("report.json", "eval_a.json", "eval_b.json")])
        finally:
            os.chdir(cwd)
    out = REPO / "benchmarks" / "example_report.json"
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    img = REPO / "docs" / "img"
    for p in plots(doc, img):
        print(p.relative_to(REPO))
    print(out.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
