"""Nothing falsely verified, every model run as it is (issue 11, items 3, 4, 5, 6): NaN/Inf in weights, outputs or
calibration data is an error, a reference whose outputs are ~0 proves nothing, static-batch models run at their
batch (or are refused, never mislabelled), initializers listed as graph inputs, and MACs counted on full shapes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import _tiny_resnet, export_torch
from graphs import G

import carve as P
from carve.pipeline.cli import main
from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import from_proto, load
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.passes import NumericCheck, Pass, PassContext, PassManager, PassResult
from carve.pipeline.runtime import ort as ortutil
from carve.pipeline.runtime.verify import verify_equal


def onnx_ok(path) -> None:
    """The file passes the full checker and runs in ONNX Runtime with finite outputs."""
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    (y,) = ortutil.run(
        path, ortutil.random_feeds(m, batch=m.graph.input[0].type.tensor_type.shape.dim[0].dim_value or 2)
    )
    assert np.isfinite(y).all()


# -- item 3: NaN / Inf, and references that prove nothing ------------------------------------------------------------


def test_nan_ridge_is_a_usage_error(tiny_resnet_onnx, tmp_path):
    out = tmp_path / "p.onnx"
    with pytest.raises(SystemExit) as e:
        main(["prune", str(tiny_resnet_onnx), "-o", str(out), "--fuse", "lsq", "--calib", "digits", "--ridge", "nan"])
    assert e.value.code == 2 and not out.exists()
    with pytest.raises(CarveError, match="repair 'lsq': ridge must be a finite number"):
        P.prune_model(load(tiny_resnet_onnx), P.PruneOptions(repairs=[{"lsq": {"ridge": float("nan")}}]), calib=None)
    with pytest.raises(CarveError, match="repair 'lsq': ridge must be at least 0"):
        P.prune_model(load(tiny_resnet_onnx), P.PruneOptions(repairs=[{"lsq": {"ridge": -1}}]), calib=None)


def test_all_nan_calibration_images_are_refused(tiny_resnet_onnx, tmp_path, capsys):
    data = tmp_path / "nan.npz"
    np.savez(data, images=np.full((16, 3, 16, 16), np.nan, np.float32))
    out = tmp_path / "p.onnx"
    rc = main(["prune", str(tiny_resnet_onnx), "-o", str(out), "--fuse", "lsq", "--calib", str(data), "--samples", "8"])
    assert rc == 1 and not out.exists()
    assert "NaN" in capsys.readouterr().err


def test_a_repair_that_produces_nan_writes_nothing(tiny_resnet_onnx, tmp_path):
    # calibration data that bypasses load_data's check: the lsq refit on it is NaN, and must be refused
    images = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32)
    images[3, 0, 0, 0] = np.nan
    calib = Dataset(images, None, "raw", Preprocess())
    with pytest.raises(CarveError, match="NaN or Inf"):
        P.prune_model(load(tiny_resnet_onnx), P.PruneOptions(repairs=["lsq"], round_to=1), calib=calib)


def test_verification_refuses_nan_outputs(tiny_resnet_onnx):
    m = load(tiny_resnet_onnx)
    bad = m.copy()
    w = next(t.name for t in bad.graph.initializer if len(t.dims) == 4)
    arr = bad.array(w).copy()
    arr[0, 0, 0, 0] = np.nan
    bad.set_array(w, arr)
    with pytest.raises(CarveError, match="NaN or Inf"):
        verify_equal(m, bad)  # max(0.0, nan) is 0.0: without the check this "verified"
    with pytest.raises(CarveError, match="NaN or Inf"):
        verify_equal(bad, bad)


def test_a_reference_with_outputs_near_zero_proves_nothing(tiny_resnet_onnx, tmp_path, capsys):
    m = onnx.load(tiny_resnet_onnx)
    for t in m.graph.initializer:  # random weights scaled to 1e-15: every output is ~0
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            arr = onnx.numpy_helper.to_array(t) * np.float32(1e-15)
            t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
        elif "bias" in t.name or "running_mean" in t.name:
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros(t.dims, np.float32), t.name))
    src = tmp_path / "tiny.onnx"
    onnx.save(m, src)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(src), "-o", str(out)]) == 1
    assert "proves nothing" in capsys.readouterr().err and not out.exists()
    assert main(["prune", str(src), "-o", str(out), "--no-verify", "-q"]) == 0  # the documented way out


class _Poison(Pass):
    name = "poison"

    def run(self, model, ctx):
        out = model.copy()
        w = next(t.name for t in out.graph.initializer if len(t.dims) == 4)
        out.set_array(w, np.full(out.array(w).shape, np.inf, np.float32))
        return PassResult(out, True)


def test_a_pass_that_brings_inf_is_refused():
    g = G((1, 3, 8, 8))
    m = from_proto(g.model([g.relu(g.conv(g.relu(g.conv("x", 4)), 4))]))
    with pytest.raises(CarveError, match="NaN or Inf"):
        PassManager([_Poison()], [NumericCheck()]).run(m, PassContext())


# -- item 4: static batch --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_tiny(tmp_path_factory):
    """The tiny ResNet exported with a static batch of 4 (what `carve export --static-batch` writes, at 4)."""
    import warnings as w

    path = tmp_path_factory.mktemp("static") / "static4.onnx"
    with w.catch_warnings():
        w.simplefilter("ignore")
        torch.onnx.export(
            _tiny_resnet(), (torch.randn(4, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"], output_names=["logits"],
        )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def rgb_npz(tmp_path_factory):
    """10 labelled random 3x16x16 images (10 is not a multiple of the static batch 4)."""
    path = tmp_path_factory.mktemp("data") / "rgb.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 255, (10, 16, 16, 3), dtype=np.uint8), labels=np.arange(10) % 10)
    return path


@pytest.mark.parametrize("flags", [["--fuse", "lsq"], ["--criterion", "hrank"], ["--repair", "bn"]])
def test_static_batch_model_calibrates_in_chunks_of_its_batch(static_tiny, rgb_npz, tmp_path, flags, capsys):
    out = tmp_path / "p.onnx"
    args = ["prune", str(static_tiny), "-o", str(out), "--calib", str(rgb_npz), "--samples", "10", "--round-to", "1"]
    rc = main([*args, *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "8 of 10 samples used, the last 2 dropped" in captured.err  # said, not silent
    onnx_ok(out)


def test_static_batch_model_is_evaluated_on_every_sample(static_tiny, rgb_npz, capsys):
    assert main(["eval", str(static_tiny), "--data", str(rgb_npz), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"]["samples"] == 10  # padded, then cut back


def test_static_batch_model_is_fine_tuned_and_verified_at_its_batch(static_tiny, rgb_npz, tmp_path, capsys):
    out = tmp_path / "f.onnx"
    args = ["finetune", str(static_tiny), "-o", str(out), "--data", str(rgb_npz), "--steps", "2", "--batch", "4"]
    rc = main([*args, "--no-flip", "--crop-pad", "0", "-q"])
    assert rc == 0, capsys.readouterr().err  # the ORT write-back check feeds the model exactly its batch of 4
    onnx_ok(out)


def test_bench_never_measures_one_batch_and_labels_it_another(static_tiny, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", str(static_tiny), str(static_tiny), "--batch", "8", "--rounds", "2", "-o", str(out), "-q"])
    assert rc == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "static batch of 4" in err and "batch 8" in err


def test_bench_at_the_static_batch_is_labelled_with_it(static_tiny):
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    cfg = MeasureConfig(backend="ort", batch=[4], rounds=2, min_round_ms=1, warmup_ms=1, memory=False)
    report = compare(static_tiny, static_tiny, cfg)
    assert report["results"][0]["batch"] == 4 and report["agreement"]["samples"] > 0


# -- item 5: initializers listed as graph inputs (keep_initializers_as_inputs) ---------------------------------------


@pytest.fixture(scope="module")
def inits_as_inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("kiai") / "kiai.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _tiny_resnet(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13,
            keep_initializers_as_inputs=True, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )  # fmt: skip
    proto = onnx.load(path)
    assert len(proto.graph.input) > 1  # the weights really are listed as inputs
    return path


@pytest.mark.parametrize("verify", [True, False])
def test_prune_of_a_model_with_initializers_as_inputs(inits_as_inputs, tmp_path, verify, capsys):
    out = tmp_path / "p.onnx"
    args = ["prune", str(inits_as_inputs), "-o", str(out), "--ratio", "0.5", "-q"] + ([] if verify else ["--no-verify"])
    assert main(args) == 0, capsys.readouterr().err
    onnx_ok(out)
    pruned = onnx.load(out)
    assert [i.name for i in pruned.graph.input] == ["input"]


def test_lsq_on_a_model_with_initializers_as_inputs(inits_as_inputs, rgb_npz, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    args = ["prune", str(inits_as_inputs), "-o", str(out), "--fuse", "lsq", "--calib", str(rgb_npz), "-q"]
    assert main(args) == 0, capsys.readouterr().err
    onnx_ok(out)


# -- item 6: MACs counted on full shapes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shuffle_pair(tmp_path_factory):
    """torchvision's ShuffleNetV2 (random weights, 32x32) exported with a dynamic batch and with a static one: the
    torchscript exporter computes the channel shuffle's reshape targets at run time from Shape ops."""
    torchvision = pytest.importorskip("torchvision")
    d = tmp_path_factory.mktemp("shuffle")
    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5().eval()
    dyn = export_torch(net, d / "dynamic.onnx", shape=(1, 3, 32, 32))
    static = d / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(static), dynamo=False, input_names=["input"])
    return dyn, static


def test_macs_do_not_depend_on_how_the_exporter_spelled_the_shapes(shuffle_pair):
    dyn, static = shuffle_pair
    expected = model_cost(load(static)).macs
    m = load(dyn)
    assert model_cost(m).macs == expected  # was about half: the convs after a shuffle counted as 1x1 outputs
    from carve.pipeline.graph.shapes import unknown_conv_outputs

    assert not unknown_conv_outputs(m)


def _fully_dynamic(src, dst, *, keep_meta: bool):
    m = onnx.load(src)
    for k, name in enumerate("NCHW"):
        d = m.graph.input[0].type.tensor_type.shape.dim[k]
        d.Clear()
        d.dim_param = name
    if not keep_meta:
        del m.metadata_props[:]
    onnx.save(m, dst)
    return dst


def test_a_fully_dynamic_input_is_warned_about_and_refused_for_mac_targets(zoo_dir, tmp_path, capsys):
    dyn = _fully_dynamic(zoo_dir / "resnet20.onnx", tmp_path / "dyn.onnx", keep_meta=False)
    assert main(["inspect", str(dyn)]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "--input-shape" in captured.err
    out = tmp_path / "p.onnx"
    assert main(["prune", str(dyn), "-o", str(out), "--target-macs", "0.5"]) == 1
    assert "--target-macs" in capsys.readouterr().err and not out.exists()
    # with the size given, the MACs are the static model's and the target is met
    assert main(["inspect", str(dyn), "--input-shape", "3x32x32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["macs"] == model_cost(load(zoo_dir / "resnet20.onnx")).macs
    assert not info["summary"]["unknown_output_sizes"]
    assert main(["prune", str(dyn), "-o", str(out), "--target-macs", "0.5", "--input-shape", "3x32x32", "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["carve.input_shape"]) == {"input": [None, 3, 32, 32]}


def test_carve_export_metadata_completes_a_dynamic_input(zoo_dir, tmp_path):
    dyn = _fully_dynamic(zoo_dir / "resnet20.onnx", tmp_path / "dyn.onnx", keep_meta=True)
    assert model_cost(load(dyn)).macs == model_cost(load(zoo_dir / "resnet20.onnx")).macs


def test_an_input_shape_that_contradicts_the_model_is_refused(zoo_dir, capsys):
    assert main(["inspect", str(zoo_dir / "resnet20.onnx"), "--input-shape", "3x64x64"]) == 1
    assert "contradicts" in capsys.readouterr().err


# -- item 9: calibration data that does not fit the model -------------------------------------------------------------


def test_grey_digits_are_refused_for_an_rgb_model(zoo_dir, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    rc = main(["prune", str(zoo_dir / "resnet20.onnx"), "-o", str(out), "--fuse", "lsq", "--calib", "digits"])
    assert rc == 1 and not out.exists()
    assert "1-channel 8x8 images do not fit the model's 3-channel input" in capsys.readouterr().err


def test_data_of_another_size_is_resized_with_a_warning(zoo_dir, tmp_path):
    from carve.pipeline.errors import CarveWarning

    m = load(zoo_dir / "resnet20.onnx")
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.warns(CarveWarning, match="16x16 images are resized to the model's 32x32"):
        data = load_data(small, model=m)
    assert next(data.batches(4))[0].shape == (4, 3, 32, 32)


# -- fuzz finding: a flipped bit that leaves a tensor name invalid UTF-8 -----------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "prune"])
def test_a_name_that_is_not_utf8_is_a_damaged_file(tiny_resnet_onnx, tmp_path, command, capsys):
    proto = onnx.load(tiny_resnet_onnx)
    data = bytearray(proto.SerializeToString())
    name = proto.graph.node[0].output[0].encode()
    k = data.find(name)
    data[k + 1] = 0xEC  # a lone UTF-8 lead byte: protobuf parses it and hands the name out as bytes
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out.onnx"
    args = [command, str(bad)] + (["-o", str(out), "-q"] if command == "prune" else [])
    assert main(args) == 1 and not out.exists()
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
