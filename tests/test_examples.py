"""The example recipes in examples/ run and meet their own thresholds."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, need_shared

from carve.pipeline.cli import main


def run_example(name: str, tmp_path) -> dict:
    rc = main(["run", str(REPO / "examples" / name), "--out-dir", str(tmp_path), "-q"])
    report = json.loads(next(tmp_path.glob("*.report.json")).read_text())
    assert rc == 0, report["thresholds"]
    return report


def test_lenet_digits_recipe(tmp_path):
    report = run_example("lenet_digits.yaml", tmp_path)
    assert report["cost"]["macs_ratio"] <= 0.5
    acc = report["accuracy"]
    assert acc["original"]["top1"] - acc["final"]["top1"] <= 0.03


@pytest.mark.shared
def test_resnet20_cifar_recipe(tmp_path):
    need_shared("models", "cifar10", "resnet20-12fca82f.th")
    need_shared("data", "cifar10", "test.npz")
    report = run_example("resnet20_cifar.yaml", tmp_path)
    assert report["accuracy"]["final"]["reference"]["top1_agreement"] >= 0.8


def test_lenet_gradual_recipe(tmp_path):
    report = run_example("lenet_gradual.yaml", tmp_path)
    (p,) = report["passes"]
    steps = p["summary"]["steps"]
    assert [round(s["keep_macs"], 3) for s in steps] == [round(0.35 ** ((k + 1) / 3), 3) for k in range(3)]
    assert all(s["macs_ratio"] <= s["keep_macs"] + 1e-9 for s in steps)
    assert all(s["top1"] >= s["top1_pruned"] - 0.01 for s in steps)  # fine-tuning recovers each step
    assert all((tmp_path / "lenet5_gradual.steps" / f"step{k}.onnx").exists() for k in (1, 2, 3))


def test_prune_then_finetune_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: zoo:lenet5\noutput: out.onnx\n"
        "data: {calib: digits:train, train: digits:train, eval: digits:test, samples: 128}\n"
        "passes:\n  - prune: {ratio: 0.6}\n"
        "  - finetune: {epochs: 2, batch: 32, flip: false, optimizer: sgd, lr: 0.02}\n"  # 78 steps: a higher rate
        "thresholds: {max_accuracy_drop: 0.03}\n"
    )
    assert main(["run", str(recipe), "-q"]) == 0
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["prune", "finetune"]
    steps = [h["step"] for h in json.loads(_metadata(tmp_path / "out.onnx")["carve.history"])]
    assert steps == ["prune", "finetune"]  # each recorded once


def test_resnet56_gradual_recipe_is_valid():
    from carve.pipeline.flows.recipe import load_recipe
    from carve.pipeline.passes import build

    recipe = load_recipe(REPO / "examples" / "resnet56_gradual.yaml")
    ((name, opts),) = recipe.passes
    assert name == "gradual" and len(build(name, **opts).keep) == 3


def _metadata(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
