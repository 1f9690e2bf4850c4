"""Fine-tuning the graph's own weights: the loss falls, zero steps write back the very same bytes, BatchNorm trains and
its running statistics are written, the written graph equals the trained module in ONNX Runtime, a resumed run ends
where an uninterrupted one does, frozen weights stay, bad data is one clear error with nothing written; the CLI, the
recipe passes and the schedules."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import carve as P
from carve.pipeline.cli import main
from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.history import history
from carve.pipeline.runtime import ort as ortutil
from carve.pipeline.training.augment import Augment
from carve.pipeline.training.finetune import FinetuneOptions, finetune
from carve.pipeline.training.schedule import Temperature, cosine_lr
from carve.plugins.passes.gradual import keep_schedule

QUICK = {"batch": 32, "flip": False, "threads": 1}  # digits are not mirror-symmetric


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """LeNet-5 trained on digits (the zoo's default weights), and the same pruned to 40% of its channels."""
    from carve import models

    path = tmp_path_factory.mktemp("ft") / "lenet5.onnx"
    models.export("lenet5", path)
    original = P.load(path)
    pruned = P.prune_model(original, P.PruneOptions(ratio=0.6)).model
    return original, pruned


def digits(model, split: str, n: int | None = None) -> Dataset:
    return load_data(f"digits:{split}", model=model, samples=n, seed=0)


def weights(model) -> dict[str, bytes]:
    return {t.name: model.array(t.name).tobytes() for t in model.graph.initializer}


def test_the_loss_falls_and_accuracy_comes_back(lenet):
    original, pruned = lenet
    test = digits(original, "test")
    opts = FinetuneOptions(epochs=3, **QUICK)
    r = finetune(pruned, digits(original, "train"), opts, teacher=original, eval_data=test)
    h = r.summary["history"]
    assert len(h) == 3 and h[-1]["loss"] < h[0]["loss"] and h[-1]["kd"] < h[0]["kd"]
    before = P.load_data("digits:test", model=original)
    from carve.pipeline.measure.evaluate import evaluate

    assert evaluate(r.model, before)["top1"] > evaluate(pruned, before)["top1"] + 0.05
    assert h[-1]["top1"] == pytest.approx(evaluate(r.model, before)["top1"], abs=0.01)  # torch eval = ORT eval
    assert r.summary["torch_vs_ort"]["max_rel"] < 1e-4
    entry = history(r.model)[-1]
    assert entry["step"] == "finetune"
    s = entry["summary"]
    assert s["steps"] == r.summary["steps"] and s["data"]["fingerprint"] and s["options"]["seed"] == 0
    assert [e["loss"] for e in s["history"]] == [e["loss"] for e in h]


def test_zero_steps_write_back_the_same_bytes(lenet):
    _, pruned = lenet
    r = finetune(pruned, digits(pruned, "train", 64), FinetuneOptions(steps=0, **QUICK), teacher=pruned)
    assert r.summary["steps"] == 0 and weights(r.model) == weights(pruned)


def _bn_data(n: int = 96) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32) * 2 + 0.5
    return Dataset(x, rng.integers(0, 10, n), "random16", Preprocess())


def test_batchnorm_trains_and_its_running_statistics_are_written(tiny_resnet_onnx):
    import torch

    from carve.pipeline.runtime.torch_graph import TorchGraph

    m = P.load(tiny_resnet_onnx)
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert bns
    r = finetune(m, _bn_data(), FinetuneOptions(epochs=2, batch=16, crop_pad=0, threads=1))
    for bn in bns:
        for stat in bn.input[3:5]:
            assert not np.array_equal(r.model.array(stat), m.array(stat)), stat  # updated by training
    # the written statistics are the ones the torch module holds: its inference output equals ORT's
    x = _bn_data(4).images
    with torch.no_grad():
        ref = TorchGraph(r.model).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ortutil.run(r.model, {"input": x})[0], ref, rtol=1e-4, atol=1e-5)


def test_folded_batchnorm_trains_the_folded_convs(tmp_path):
    from carve import models

    models.export("lenet5", tmp_path / "folded.onnx", fold_bn=True)
    m = P.load(tmp_path / "folded.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in m.graph.node)
    r = finetune(m, digits(m, "train", 128), FinetuneOptions(epochs=1, **QUICK), teacher=m)
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    assert not np.array_equal(r.model.array(conv.input[1]), m.array(conv.input[1]))


def test_frozen_and_non_float_initializers_stay(lenet):
    _, pruned = lenet
    first = next(n for n in pruned.graph.node if n.op_type == "Conv")
    opts = FinetuneOptions(epochs=1, freeze=[first.name], **QUICK)
    r = finetune(pruned, digits(pruned, "train", 128), opts, teacher=pruned)
    before, after = weights(pruned), weights(r.model)
    for name in first.input[1:]:
        assert after[name] == before[name], name
    for t in pruned.graph.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            assert after[t.name] == before[t.name], t.name
    assert any(after[k] != before[k] for k in before)  # the rest trained
    with pytest.raises(CarveError, match="matches no node"):
        finetune(pruned, digits(pruned, "train", 64), FinetuneOptions(epochs=1, freeze=["nothing*"], **QUICK))


def test_resume_continues_exactly(lenet, tmp_path):
    original, pruned = lenet
    data = digits(original, "train", 256)
    opts = FinetuneOptions(epochs=3, **QUICK)
    straight = finetune(pruned, data, opts, teacher=original).model
    ckpt = tmp_path / "run.ckpt"

    def interrupt(stage, done=None, total=None, **info):
        if stage == "train: step" and info["epoch"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pruned, data, opts, teacher=original, checkpoint=ckpt, progress=interrupt)
    assert ckpt.is_file()
    resumed = finetune(pruned, data, opts, teacher=original, checkpoint=ckpt, resume=True)
    assert resumed.summary["resumed_from_epoch"] == 2 and resumed.summary["epochs"] == 3
    assert weights(resumed.model) == weights(straight)
    with pytest.raises(CarveError, match="another options"):
        finetune(pruned, data, FinetuneOptions(epochs=3, **{**QUICK, "lr": 0.1}), checkpoint=ckpt, resume=True)


def test_bad_data_is_one_clear_error_and_nothing_is_written(lenet, tmp_path, capsys):
    original, pruned = lenet
    src, teacher, out = tmp_path / "s.onnx", tmp_path / "t.onnx", tmp_path / "out.onnx"
    P.save(pruned, src)
    P.save(original, teacher)
    rng = np.random.default_rng(0)
    bad = {
        "wrong shape": (rng.integers(0, 255, (10, 5)).astype(np.uint8), np.zeros(10, int), "images must be"),
        "wrong channels": (rng.integers(0, 255, (10, 2, 32, 32)).astype(np.uint8), np.zeros(10, int), "channels"),
        "labels out of range": (rng.integers(0, 255, (10, 32, 32, 1)).astype(np.uint8), np.full(10, 42), "labels"),
    }
    for name, (images, labels, needle) in bad.items():
        path = tmp_path / f"{name.replace(' ', '_')}.npz"
        np.savez(path, images=images, labels=labels)
        rc = main(["finetune", str(src), "--teacher", str(teacher), "--data", str(path), "-o", str(out), "-q"])
        err = capsys.readouterr().err
        assert rc == 1 and needle in err and "Traceback" not in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob("*.ckpt")), name
    (tmp_path / "empty").mkdir()
    rc = main(["finetune", str(src), "--data", str(tmp_path / "empty"), "-o", str(out), "-q"])
    assert rc == 1 and "no images" in capsys.readouterr().err and not out.exists()
    rc = main(["finetune", str(src), "--data", "digits", "--temperature", "4:0", "-o", str(out), "-q"])
    assert rc == 1 and "temperature" in capsys.readouterr().err


def test_cli_end_to_end(lenet, tmp_path, capsys):
    original, pruned = lenet
    src, teacher, out = tmp_path / "s.onnx", tmp_path / "t.onnx", tmp_path / "ft.onnx"
    P.save(pruned, src)
    P.save(original, teacher)
    args = ["finetune", str(src), "--teacher", str(teacher), "--data", "digits:train", "--eval", "digits:test"]
    args += ["--epochs", "2", "--batch", "32", "--no-flip", "--temperature", "4:1", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "epoch 1/2" in text and "epoch 2/2" in text and "(teacher " in text and f"wrote {out}" in text
    assert out.exists() and not (tmp_path / "ft.onnx.ckpt").exists()
    assert main(args[:-2] + ["-o", str(tmp_path / "j.onnx"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["options"]["temperature"] == "4:1" and s["accuracy"]["final"]["top1"] > 0.9


def test_without_eval_the_agreement_is_printed_on_held_back_images(lenet, tmp_path, capsys):
    """No --eval: the student's agreement with the teacher on images of --data it was not trained on (the ones
    --samples left out; else a tenth of them, held out of training)."""
    from carve.pipeline.data.datasets import load_data
    from carve.pipeline.flows.finetune import hold_back

    original, pruned = lenet
    src, teacher = tmp_path / "s.onnx", tmp_path / "t.onnx"
    P.save(pruned, src)
    P.save(original, teacher)
    base = ["finetune", str(src), "--teacher", str(teacher), "--data", "digits:train", "--steps", "2", "--batch", "16"]
    assert main([*base, "--samples", "200", "-o", str(tmp_path / "a.onnx"), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc["held_back"] == acc["final"]["samples"] == 1000  # the images --samples left out, at most 1000
    assert 0.0 <= acc["final"]["reference"]["top1_agreement"] <= 1.0
    assert main([*base, "-o", str(tmp_path / "b.onnx")]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement with the teacher" in out and "held back from training" in out
    # held-back images are never trained on, in either case
    for samples in (200, None):
        train = load_data("digits:train", samples=samples)
        kept, held = hold_back(train, seed=1)
        assert len(held) > 0 and not set(kept.indices) & set(held.indices)
        assert len(kept) == (200 if samples else len(train) - len(held))


def test_schedules_and_augmentation():
    t = Temperature.parse("4:1")
    assert (t.at(0), t.at(0.5), t.at(1)) == (4.0, 2.5, 1.0) and Temperature.parse("3").at(0.7) == 3.0
    with pytest.raises(CarveError):
        Temperature.parse("hot")
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1) and cosine_lr(100, 100, 0.1) == pytest.approx(0.0)
    assert cosine_lr(0, 100, 0.1, warmup=10) == pytest.approx(0.01)
    x = np.random.default_rng(0).standard_normal((8, 3, 12, 12)).astype(np.float32)
    a = Augment(4, True)(x, np.random.default_rng(5))
    assert a.shape == x.shape and np.array_equal(a, Augment(4, True)(x, np.random.default_rng(5)))
    assert not np.array_equal(a, x)
    assert keep_schedule(0.5, steps=2) == pytest.approx([0.5**0.5, 0.5])
    assert keep_schedule(0.5, per_step=0.2)[-1] == pytest.approx(0.5) and len(keep_schedule(0.5, per_step=0.2)) == 4
    with pytest.raises(CarveError):
        keep_schedule(0.5)
