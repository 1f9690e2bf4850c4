"""The model zoo: every model builds, exports to ONNX that computes what torch computes, keeps BN unless asked,
loads the trained CIFAR weights; LeNet-5 trains on digits; `carve export` works and fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, zoo_input_size

from carve import models
from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError, MissingDependencyError
from carve.pipeline.runtime import ort as ortutil

NAMES = models.available()


def test_the_zoo_has_what_the_issue_asks_for():
    assert set(NAMES) >= {
        "lenet5",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "vgg16_bn",
        "resnet18",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "densenet121",
        "unet",
        "detector",
    }


@pytest.mark.parametrize("name", NAMES)
def test_onnx_matches_torch(name, zoo_dir):
    size = zoo_input_size(name)
    net = models.build(name, input_size=size)
    shape = (2, *models.spec(name).input(size))
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    ref = ref if isinstance(ref, tuple) else (ref,)
    outs = ortutil.run(zoo_dir / f"{name}.onnx", {"input": x})
    assert len(outs) == len(ref) == len(models.spec(name).outputs)
    for a, b in zip(outs, ref):
        b = b.numpy()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * max(float(np.abs(b).max()), 1e-6))
    proto = onnx.load(zoo_dir / f"{name}.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["carve.source"] == f"zoo:{name}" and "mean" in meta["carve.preprocess"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_bn_is_kept_by_default_and_folded_on_request(tmp_path, zoo_dir):
    kept = onnx.load(zoo_dir / "resnet20.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in kept.graph.node) == 19
    info = models.export("resnet20", tmp_path / "f.onnx", fold_bn=True)
    folded = onnx.load(info.path)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a = ortutil.run(zoo_dir / "resnet20.onnx", {"input": x})[0]
    b = ortutil.run(info.path, {"input": x})[0]
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max())


def test_option_a_shortcut_exports_a_channel_pad(zoo_dir):
    from carve.pipeline.graph import load

    m = load(zoo_dir / "resnet20.onnx")
    pads = [m.array(n.input[1]) for n in m.graph.node if n.op_type == "Pad"]
    assert [list(p) for p in pads] == [[0, 8, 0, 0, 0, 8, 0, 0], [0, 16, 0, 0, 0, 16, 0, 0]]


@pytest.mark.shared
def test_trained_resnet20_on_cifar(resnet20_weights, cifar_test, zoo_dir):
    from carve.pipeline.data.capture import predict
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.graph import load

    m = load(zoo_dir / "resnet20.onnx")
    assert "resnet20-12fca82f.th" in m.metadata()["carve.weights"]
    data = load_data(cifar_test, model=m, samples=1000, seed=0)
    acc = (predict(m, data).argmax(1) == data.labels[data.indices]).mean()
    assert acc >= 0.78  # 81.03% on the full JPEG-compressed test set


def test_lenet5_trains_on_digits():
    from carve.models.train import lenet5_digits

    net, metrics = lenet5_digits()
    assert metrics["test_acc"] >= 0.95 and metrics["train_acc"] >= 0.97


def test_wrong_checkpoint_is_refused(tmp_path):
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(3)}}, tmp_path / "bad.th")
    with pytest.raises(CarveError, match="does not fit this model"):
        models.build("resnet20", weights=str(tmp_path / "bad.th"))


def test_missing_torchvision_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'carve\[zoo\]'"):
        models.build("resnet18")


def test_export_cli(tmp_path, capsys):
    out = tmp_path / "l.onnx"
    assert main(["export", "lenet5", "-o", str(out)]) == 0
    assert "trained on digits" in capsys.readouterr().out
    assert main(["export", "--list"]) == 0
    assert "option-A" in capsys.readouterr().out
    assert main(["export", "nope", "-o", str(tmp_path / "x.onnx")]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["export", "unet", "-o", str(tmp_path / "missing" / "x.onnx")]) == 1
    assert main(["export", "resnet20", "-o", str(tmp_path / "y.onnx"), "--input-size", "64"]) == 1
    assert "fixed 32x32 input" in capsys.readouterr().err


def test_export_cli_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "carve",
            "export",
            "detector",
            "-o",
            str(tmp_path / "d.onnx"),
            "--static-batch",
            "--opset",
            "13",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    proto = onnx.load(tmp_path / "d.onnx")
    assert [o.name for o in proto.graph.output] == ["out0", "out1"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    from carve.pipeline.graph import load
    from carve.pipeline.graph.channels import analyse

    info = models.export("mobilenet_v3_small", tmp_path / "d.onnx", exporter="dynamo", input_size=64)
    assert info.opset >= 18
    m = load(info.path)
    assert analyse(m).summary()["prunable_fraction"] > 0.8
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = models.build("mobilenet_v3_small", input_size=64)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ortutil.run(m, {"input": x})[0], ref, atol=1e-4 * np.abs(ref).max())
