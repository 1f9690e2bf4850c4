"""The example recipes in examples/ run and meet their own thresholds."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, need_shared

from pipeline.cli import main


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
