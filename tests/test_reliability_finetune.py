"""Issue 21 on ``carve finetune``: every file it reads is an input of the output check (--eval, --data, shared:),
--resume continues only a checkpoint made for the same model content, teacher, data and options whose tensors match
by name, shape and dtype, and bad inputs are named as such (a NaN weight, overflowing pixels, everything frozen, a
teacher of another input size, unlabelled --eval) instead of "diverged" or an exit 3."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import _tiny_resnet, export_torch
from onnx import numpy_helper as nh

from carve.pipeline.cli import main

QUICK = ["--samples", "64", "--epochs", "1", "--batch", "32", "--no-flip", "-q"]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    from carve import models

    folder = tmp_path_factory.mktemp("ftrel")
    models.export("lenet5", folder / "l5.onnx")
    models.export("lenet5", folder / "other.onnx", weights="random")
    rng = np.random.default_rng(0)
    np.savez(
        folder / "data.npz", images=rng.integers(0, 255, (64, 32, 32, 1)).astype(np.uint8), labels=np.arange(64) % 10
    )
    return folder


def _scaled(src, dst, factor=None, nan=False):
    m = onnx.load(src)
    t = m.graph.initializer[0]
    a = nh.to_array(t).copy()
    if nan:
        a.flat[0] = np.nan
    else:
        a *= factor
    t.CopyFrom(nh.from_array(a, t.name))
    onnx.save(m, dst)
    return dst


@pytest.mark.parametrize("flag", ["--eval", "--data"])
def test_the_data_it_reads_is_never_the_output(lenet, tmp_path, capsys, flag):
    data = tmp_path / "test.npz"
    data.write_bytes((lenet / "data.npz").read_bytes())
    before = data.read_bytes()
    args = ["finetune", str(lenet / "l5.onnx"), "--data", "digits:train", flag, str(data), *QUICK, "-o", str(data)]
    rc, _, err = _run(args, capsys)
    assert rc == 1 and "never overwrites its input" in _one_error(err)
    assert data.read_bytes() == before


def test_a_shared_data_source_is_an_input_too(lenet, tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    data = shared / "data" / "train.npz"
    data.write_bytes((lenet / "data.npz").read_bytes())
    monkeypatch.setenv("CARVE_SHARED", str(shared))
    args = ["finetune", str(lenet / "l5.onnx"), "--data", "shared:data/train.npz", *QUICK, "-o", str(data)]
    rc, _, err = _run(args, capsys)
    assert rc == 1 and "never overwrites its input" in _one_error(err)
    assert data.read_bytes() == (lenet / "data.npz").read_bytes()


def test_recipe_output_over_a_shared_data_source_is_refused(lenet, tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    data = shared / "data" / "calib.npz"
    data.write_bytes((lenet / "data.npz").read_bytes())
    monkeypatch.setenv("CARVE_SHARED", str(shared))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {lenet / 'l5.onnx'}\noutput: {data}\ndata: {{calib: 'shared:data/calib.npz'}}\n"
        "passes: [{prune: {ratio: 0.5}}]\n"
    )
    rc, _, err = _run(["run", str(recipe)], capsys)
    assert rc == 1 and "overwrite" in _one_error(err)
    assert data.read_bytes() == (lenet / "data.npz").read_bytes()


@pytest.fixture(scope="module")
def checkpoint(lenet, tmp_path_factory):
    """A finished run's checkpoint (kept), made with a teacher: what --resume would continue."""
    folder = tmp_path_factory.mktemp("ck")
    out = folder / "ft.onnx"
    args = ["finetune", str(lenet / "l5.onnx"), "--teacher", str(lenet / "l5.onnx"), "--data", "digits:train"]
    assert main([*args, *QUICK, "--keep-checkpoint", "-o", str(out)]) == 0
    return folder / "ft.onnx.ckpt"


def _resume_with(lenet, tmp_path, ckpt_bytes: bytes, capsys, *, student=None, teacher=None):
    out = tmp_path / "ft.onnx"
    (tmp_path / "ft.onnx.ckpt").write_bytes(ckpt_bytes)
    args = ["finetune", str(student or lenet / "l5.onnx"), "--teacher", str(teacher or lenet / "l5.onnx")]
    return _run([*args, "--data", "digits:train", *QUICK, "--resume", "-o", str(out)], capsys)


def test_resume_continues_its_own_checkpoint(lenet, tmp_path, checkpoint, capsys):
    rc, _, err = _resume_with(lenet, tmp_path, checkpoint.read_bytes(), capsys)
    assert rc == 0, err


def test_resume_refuses_another_teacher(lenet, tmp_path, checkpoint, capsys):
    rc, _, err = _resume_with(lenet, tmp_path, checkpoint.read_bytes(), capsys, teacher=lenet / "other.onnx")
    assert rc == 1 and "another teacher" in _one_error(err)


def test_resume_refuses_a_model_whose_weights_changed(lenet, tmp_path, checkpoint, capsys):
    """Same graph, same shapes, other weights: the key is the content, not the structure."""
    student = _scaled(lenet / "l5.onnx", tmp_path / "l5.onnx", factor=1.5)
    rc, _, err = _resume_with(lenet, tmp_path, checkpoint.read_bytes(), capsys, student=student)
    assert rc == 1 and "another model" in _one_error(err)


@pytest.mark.parametrize("damage", ["shape", "dtype", "missing", "nan", "epoch"])
def test_resume_checks_every_tensor_by_name_shape_and_dtype(lenet, tmp_path, checkpoint, capsys, damage):
    ck = torch.load(checkpoint, weights_only=True)
    name = next(iter(ck["params"]))
    if damage == "shape":
        ck["params"][name] = torch.zeros(1)  # would broadcast into the weight (all zero, then "verified")
    elif damage == "dtype":
        ck["params"][name] = ck["params"][name].double()
    elif damage == "missing":
        del ck["params"][name]
    elif damage == "nan":
        ck["params"][name] = ck["params"][name].clone().fill_(float("nan"))
    else:
        ck["epoch"] = "one"
    bad = tmp_path / "bad.ckpt"
    torch.save(ck, bad)
    rc, _, err = _resume_with(lenet, tmp_path, bad.read_bytes(), capsys)
    assert rc == 1 and "ft.onnx.ckpt" in _one_error(err), err
    assert not (tmp_path / "ft.onnx").exists()


def test_a_nan_weight_is_named_not_diverged(lenet, tmp_path, capsys):
    bad = _scaled(lenet / "l5.onnx", tmp_path / "nan.onnx", nan=True)
    rc, _, err = _run(["finetune", str(bad), "--data", "digits:train", *QUICK, "-o", str(tmp_path / "o.onnx")], capsys)
    line = _one_error(err)
    assert rc == 1 and "NaN" in line and "nan.onnx" in line and "diverged" not in err and "lower" not in err


def test_pixels_that_overflow_float32_are_named_not_diverged(lenet, tmp_path, capsys):
    big = tmp_path / "big.npz"
    rng = np.random.default_rng(0)
    np.savez(big, images=rng.random((64, 32, 32, 1)) * 1e39, labels=np.arange(64) % 10)
    rc, _, err = _run(
        ["finetune", str(lenet / "l5.onnx"), "--data", str(big), *QUICK, "-o", str(tmp_path / "o.onnx")], capsys
    )
    line = _one_error(err)
    assert rc == 1 and "overflow float32" in line and "big.npz" in line and "diverged" not in err


def test_freezing_everything_is_a_user_error(lenet, tmp_path, capsys):
    args = ["finetune", str(lenet / "l5.onnx"), "--data", "digits:train", "--freeze", "*", *QUICK]
    rc, _, err = _run([*args, "-o", str(tmp_path / "o.onnx")], capsys)
    assert rc == 1 and "nothing is left to train" in _one_error(err)


def test_a_teacher_of_another_input_size_is_a_user_error(tmp_path, capsys):
    s16 = export_torch(_tiny_resnet(), tmp_path / "s16.onnx", (1, 3, 16, 16))
    t24 = export_torch(_tiny_resnet(), tmp_path / "t24.onnx", (1, 3, 24, 24))
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", images=rng.integers(0, 255, (64, 16, 16, 3)).astype(np.uint8), labels=np.arange(64) % 2
    )
    args = ["finetune", str(s16), "--teacher", str(t24), "--data", str(tmp_path / "d.npz"), *QUICK]
    rc, _, err = _run([*args, "-o", str(tmp_path / "o.onnx")], capsys)
    assert rc == 1 and "distillation needs two models with the same input" in _one_error(err)


def test_unlabelled_eval_data_says_so_instead_of_top1_zero(lenet, tmp_path, capsys):
    unl = tmp_path / "unl.npz"
    np.savez(unl, images=np.random.default_rng(0).integers(0, 255, (64, 32, 32, 1)).astype(np.uint8))
    args = ["finetune", str(lenet / "l5.onnx"), "--teacher", str(lenet / "l5.onnx"), "--data", "digits:train"]
    args += ["--eval", str(unl), "--samples", "64", "--epochs", "1", "--batch", "32", "--no-flip"]
    rc, out, err = _run([*args, "-o", str(tmp_path / "o.onnx")], capsys)
    assert rc == 0, err
    assert "top-1 0.00%" not in out and "has no labels" in err


@pytest.mark.parametrize("epochs", ["nan", "inf", "-1", "1e400"])
def test_nonsense_epochs_are_refused(lenet, tmp_path, capsys, epochs):
    args = ["finetune", str(lenet / "l5.onnx"), "--data", "digits:train", "--epochs", epochs, "-q"]
    rc, _, err = _run([*args, "-o", str(tmp_path / "o.onnx")], capsys)
    assert rc in (1, 2) and "--epochs" in _one_error(err) and not (tmp_path / "o.onnx").exists()
