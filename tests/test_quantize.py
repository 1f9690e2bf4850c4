"""``carve quantize`` and the ``quantize`` pass: QDQ INT8 through ONNX Runtime's quantizer, agreement measured, the
``keep_fp32: auto`` sensitivity search, integer kernels checked, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import _tiny_resnet, export_torch

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import load
from carve.pipeline.graph.history import history
from carve.pipeline.graph.precision import is_quantized, kernel_census
from carve.pipeline.runtime.ort import run


@pytest.fixture
def model(tmp_path, tiny_resnet_onnx):
    p = tmp_path / "m.onnx"
    p.write_bytes(tiny_resnet_onnx.read_bytes())
    return p


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory) -> Path:
    """Two linear convs in a row whose middle tensor has one channel 1000x the others: per-tensor INT8 on that tensor
    wipes out the small channels, so full INT8 changes the predictions and only keeping both convs in FP32 (which
    leaves the tensor unquantized) restores them. Function-preserving: c2 divides what c1 multiplies."""
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
            self.c3, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.c3(torch.relu(self.c2(self.c1(x)))))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.c1.weight[0] *= 1000
        net.c1.bias[0] *= 1000
        net.c2.weight[:, 0] /= 1000
    return export_torch(net, tmp_path_factory.mktemp("outlier") / "outlier.onnx")


@pytest.fixture(scope="module")
def random_images(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("rand") / "rand.npz"
    np.savez(p, images=np.random.default_rng(0).integers(0, 255, (64, 16, 16, 3)).astype(np.uint8))
    return p


def weight_quantized(proto: onnx.ModelProto, node: str) -> bool:
    dq = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return next(n for n in proto.graph.node if n.name == node).input[1] in dq


def test_cli_quantize_writes_qdq_with_history_and_agreement(model, tmp_path, digits_rgb, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "q.json"
    args = ["quantize", str(model), "-o", str(out), "--calib", str(digits_rgb["train"]), "--samples", "128"]
    assert main([*args, "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement" in text and "wrote" in text and "integer kernels" in text
    q = load(out)
    assert is_quantized(q)
    assert history(q)[-1]["step"] == "quantize"
    s = json.loads(report.read_text())
    assert s["tool"] == "onnxruntime.quantization.quantize_static" and s["format"] == "QDQ"
    assert s["calibration_samples"] == 128 and s["int8_compute_nodes"] == s["compute_nodes"] == 6
    logits = s["agreement"]["outputs"]["logits"]
    assert logits["top1_agreement"] >= 0.9 and logits["max_abs_error"] > 0  # lossy, and measured
    assert {"top1_fp32", "top1_int8"} <= set(logits)  # digits carry labels
    assert s["budget"]["measure"] == "top-1 accuracy points lost"
    assert s["weight_bytes"]["int8"] < s["weight_bytes"]["fp32"] / 2
    # ONNX Runtime's CPU provider fuses the QDQ pairs into integer kernels
    assert s["kernels"]["verdict"] == "integer" and s["kernels"]["integer_ops"]["QLinearConv"] == 5
    # per-channel symmetric weights: one scale per output channel, zero points 0
    proto = onnx.load(out)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    w_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None]
    conv_w = [n for n in w_dq if inits[n.input[0]].ndim == 4]
    assert conv_w and all(inits[n.input[1]].ndim == 1 and not inits[n.input[2]].any() for n in conv_w)
    # the INT8 model runs on a batch size other than the calibration's (dynamic batch kept)
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert run(q, {"input": x})[0].shape == (3, 10)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(model, tmp_path, digits_rgb, capsys, method):
    out = tmp_path / f"{method}.onnx"
    args = ["quantize", str(model), "-o", str(out), "--calib", str(digits_rgb["train"]), "--samples", "64"]
    assert main([*args, "--calibration", method, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["calibration"] == method and is_quantized(load(out))


def test_static_batch_and_external_data(tmp_path, digits_rgb):
    """A static-batch export calibrates at its batch; a model with external data gets an INT8 model with external
    data, written next to it, the input untouched."""
    from carve.pipeline.data.datasets import Preprocess, load_data
    from carve.pipeline.flows.passes import run_passes
    from carve.pipeline.graph import save
    from carve.pipeline.passes import build

    src = tmp_path / "static.onnx"
    export_static = export_torch(_tiny_resnet(), tmp_path / "dyn.onnx")
    proto = onnx.load(export_static)
    for vi in [proto.graph.input[0], proto.graph.output[0]]:
        vi.type.tensor_type.shape.dim[0].Clear()
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(proto, src)
    m = load(src)
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    save(m, ext, external_data=True)
    (m_data,) = ext.parent.glob("m.onnx.*.data")  # named after its content (pairs replaced whole)
    before = m_data.read_bytes()
    m = load(ext)
    assert m.external_data
    data = load_data(digits_rgb["train"], model=m, preprocess=Preprocess.for_model(m), samples=30)
    out = tmp_path / "ext" / "q.onnx"
    r = run_passes(ext, out, [build("quantize")], model=m, calib=data)
    s = r.results[0].summary
    assert s["calibration_samples"] == 30  # 8 batches of 4, the padded rows of the last one cut
    assert len(list((tmp_path / "ext").glob("q.onnx.*.data"))) == 1
    assert m_data.read_bytes() == before
    q = load(out)
    assert is_quantized(q)
    assert run(q, {"input": np.zeros((4, 3, 16, 16), np.float32)})[0].shape == (4, 10)


def test_keep_fp32_auto_finds_the_sensitive_nodes(outlier_onnx, random_images, tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    args = ["quantize", str(outlier_onnx), "-o", str(out), "--calib", str(random_images), "--samples", "64"]
    assert main([*args, "--keep-fp32", "auto", "--max-drop", "2", "--report", str(report)]) == 0
    s = json.loads(report.read_text())
    assert s["search"][0]["kept_auto"] == 0 and s["search"][0]["drop"] > 2  # full INT8 breaks the budget
    kept = {k["node"] for k in s["kept_fp32"]}
    assert kept == {"/c1/Conv", "/c2/Conv"}
    assert all("sensitivity rank" in k["why"] for k in s["kept_fp32"])
    assert s["budget"]["met"] and s["budget"]["drop"] <= 2
    assert [r["rank"] for r in s["sensitivity"]] == [1, 2, 3, 4]
    assert {r["node"] for r in s["sensitivity"][:2]} == kept
    proto = onnx.load(out)
    assert not weight_quantized(proto, "/c1/Conv") and not weight_quantized(proto, "/c2/Conv")
    assert weight_quantized(proto, "/c3/Conv")
    assert s["kernels"]["verdict"] == "mixed"
    assert "kept FP32: /c" in capsys.readouterr().out


def test_keep_fp32_by_name_and_budget_warning(outlier_onnx, random_images, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    args = ["quantize", str(outlier_onnx), "-o", str(out), "--calib", str(random_images), "--samples", "32"]
    assert main([*args, "--keep-fp32", "/fc/*", "--json"]) == 0
    captured = capsys.readouterr()
    s = json.loads(captured.out)
    assert [k["node"] for k in s["kept_fp32"]] == ["/fc/Gemm"] and not s["budget"]["met"]
    assert "is above `max_drop`" in captured.err or "--max-drop" in captured.err
    assert not weight_quantized(onnx.load(out), "/fc/Gemm")


def test_quantize_pass_in_a_recipe(model, tmp_path, digits_rgb):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {model}\noutput: {tmp_path / 'out.onnx'}\n"
        f"data: {{calib: {digits_rgb['train']}, eval: {digits_rgb['test']}, samples: 64, eval_samples: 100}}\n"
        "passes:\n  - prune: {ratio: 0.3}\n  - quantize: {method: minmax}\n"
    )
    assert main(["run", str(recipe), "-q"]) == 0
    q = load(tmp_path / "out.onnx")
    assert is_quantized(q)
    assert [h["step"] for h in history(q)] == ["prune", "quantize"]


def test_bad_input_is_one_line(model, tmp_path, digits_rgb, capsys):
    out = str(tmp_path / "q.onnx")
    # no calibration data
    assert main(["quantize", str(model), "-o", out]) == 1
    err = capsys.readouterr().err
    assert "needs calibration data" in err and "Traceback" not in err
    # data that does not fit (8x8 grey digits for a 3x16x16 model)
    assert main(["quantize", str(model), "-o", out, "--calib", "digits"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("carve quantize: error:") and "digits" in err and "Traceback" not in err
    # a node pattern that names nothing
    calib = ["--calib", str(digits_rgb["train"]), "--samples", "16"]
    assert main(["quantize", str(model), "-o", out, *calib, "--keep-fp32", "/nope/*"]) == 1
    assert "'/nope/*' names no node" in capsys.readouterr().err
    # an op ONNX Runtime's quantizer cannot quantize, asked for by name
    assert main(["quantize", str(model), "-o", out, *calib, "--include", "*GlobalAveragePool*"]) == 1
    err = capsys.readouterr().err
    assert "GlobalAveragePool" in err and "cannot be quantized" in err
    assert not Path(out).exists()
    # a quantized model: not quantized again, and not pruned
    assert main(["quantize", str(model), "-o", out, *calib, "-q"]) == 0
    assert main(["quantize", out, "-o", str(tmp_path / "qq.onnx"), *calib]) == 1
    assert "already quantized" in capsys.readouterr().err
    # nor rewritten by any pass that changes weights: INT8 weights behind DequantizeLinear are invisible to them
    for verb, extra in [("prune", ["--ratio", "0.3"]), ("decompose", []), ("merge", []), ("sparsify", [])]:
        written = tmp_path / f"{verb}.onnx"
        assert main([verb, out, "-o", str(written), *extra]) == 1, verb
        err = capsys.readouterr().err
        assert "is quantized" in err and f"carve can {verb} FP32 models only" in err, err
        assert f"{verb} the FP32 model first, then `carve quantize`" in err and not written.exists()


def test_kernel_census_verdicts():
    from onnx import helper

    def graph(*ops):
        nodes = [helper.make_node(op, [], [f"y{k}"], name=f"n{k}") for k, op in enumerate(ops)]
        return helper.make_model(helper.make_graph(nodes, "g", [], []))

    assert kernel_census(graph("QLinearConv", "QGemm", "QuantizeLinear"))["verdict"] == "integer"
    c = kernel_census(graph("QLinearConv", "FusedConv", "DequantizeLinear"))
    assert c["verdict"] == "mixed" and c["float_compute_ops"] == {"FusedConv": 1}
    assert kernel_census(graph("DequantizeLinear", "Conv"))["verdict"] == "float"


def test_trt_plans_explicit_int8_without_a_gpu(model, tmp_path, digits_rgb):
    """TensorRT builds a QDQ model strongly typed as it is (explicit INT8), which needs symmetric INT8 Q/DQ: the plan
    says so, and refuses ORT's CPU default (UINT8 activations) with the hint, all without TensorRT or a GPU."""
    from carve.pipeline.measure.backends import EngineConfig
    from carve.pipeline.measure.backends.trt import build_plan, engine_key

    calib = ["--calib", str(digits_rgb["train"]), "--samples", "32", "-q"]
    s8, u8 = tmp_path / "s8.onnx", tmp_path / "u8.onnx"
    assert main(["quantize", str(model), "-o", str(s8), "--activations", "int8", *calib]) == 0
    assert main(["quantize", str(model), "-o", str(u8), *calib]) == 0
    plan = build_plan(EngineConfig(batch=8), "10.13.0", onnx.load(s8))
    assert plan.explicit_int8 and plan.strongly_typed_flag and not plan.fp16_graph
    fp32 = build_plan(EngineConfig(batch=8), "10.13.0", onnx.load(model))
    assert not fp32.explicit_int8
    assert engine_key(b"m", "10.13.0", "H100", plan) != engine_key(b"m", "10.13.0", "H100", fp32)
    with pytest.raises(CarveError, match="symmetric INT8") as exc:
        build_plan(EngineConfig(), "11.0.0", onnx.load(u8))
    assert "--activations int8" in exc.value.hint
    with pytest.raises(CarveError, match="FP16 graph of a QDQ model"):
        build_plan(EngineConfig(precision="fp16"), "10.13.0", onnx.load(s8))


def test_openvino_backend_runs_fp32_fp16_and_int8(model, tmp_path, digits_rgb):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra: pip install 'carve[openvino]'")
    from carve.pipeline.measure.backends import EngineConfig, build

    q = tmp_path / "q.onnx"
    assert (
        main(["quantize", str(model), "-o", str(q), "--calib", str(digits_rgb["train"]), "--samples", "64", "-q"]) == 0
    )
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = run(load(model), {"input": x})[0]
    e = build("openvino", model, EngineConfig(batch=2, threads=1))
    info = e.info()
    assert info["properties_applied"]["INFERENCE_NUM_THREADS"] == "1"
    assert info["properties_applied"]["NUM_STREAMS"] == "1"
    assert info["inference_precision"] == "float32"
    assert sum(info["int8_layers"].values()) == 0
    np.testing.assert_allclose(e.outputs({"input": x})[0], ref, rtol=1e-3, atol=1e-4)
    assert e.time(3) > 0
    h = build("openvino", model, EngineConfig(batch=2, threads=2, precision="fp16")).info()
    assert h["properties_requested"]["INFERENCE_PRECISION_HINT"] == "f16"
    assert h["properties_applied"]["INFERENCE_NUM_THREADS"] == "2"
    # what the CPU really runs is read back: f16 where it has FP16 arithmetic, else bf16 or f32
    assert h["inference_precision"] in ("float16", "bfloat16", "float32")
    i8 = build("openvino", q, EngineConfig(batch=2, threads=1))
    assert i8.info()["int8_layers"]["Convolution"] == 5  # the QDQ convolutions ran in INT8
    # on real data OpenVINO's INT8 agrees with ONNX Runtime's INT8 run of the same QDQ model
    from carve.pipeline.data.datasets import Preprocess, load_data

    m = load(model)
    real, _ = load_data(digits_rgb["test"], model=m, preprocess=Preprocess.for_model(m), samples=2).arrays()
    ort_int8 = run(load(q), {"input": real})[0]
    assert np.abs(i8.outputs({"input": real})[0] - ort_int8).max() < 0.1 * np.abs(ort_int8).max()


def test_openvino_missing_is_exit_1_with_the_install_hint(model, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_openvino(name, *a, **k):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    assert main(["bench", str(model), str(model), "--backend", "openvino"]) == 1
    err = capsys.readouterr().err
    assert "openvino" in err and "pip install 'carve[openvino]'" in err and "Traceback" not in err


def test_openvino_compile_config_without_openvino():
    from carve.pipeline.measure.backends import EngineConfig
    from carve.pipeline.measure.backends.openvino import compile_config

    c = compile_config(EngineConfig(threads=2, precision="fp16"))
    assert c == {
        "INFERENCE_NUM_THREADS": 2,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f16",
    }
    with pytest.raises(CarveError, match="CPU plugin only"):
        compile_config(EngineConfig(device="cuda"))
    with pytest.raises(CarveError, match="fp32 or fp16"):
        compile_config(EngineConfig(precision="int8"))


def test_ort_engine_reports_the_integer_kernels(model, tmp_path, digits_rgb):
    from carve.pipeline.measure.backends import EngineConfig, build

    q = tmp_path / "q.onnx"
    assert (
        main(["quantize", str(model), "-o", str(q), "--calib", str(digits_rgb["train"]), "--samples", "32", "-q"]) == 0
    )
    info = build("ort", q, EngineConfig(batch=2)).info()
    assert info["int8_kernels"]["verdict"] == "integer" and info["int8_kernels"]["integer_ops"]["QLinearConv"] == 5
    assert "int8_kernels" not in build("ort", model, EngineConfig(batch=2)).info()


def test_python_api(model, tmp_path, digits_rgb):
    import carve

    m = carve.load(model)
    calib = carve.load_data(digits_rgb["train"], model=m, samples=64)
    q, summary = carve.quantize(m, calib, method="percentile")
    assert is_quantized(q) and summary["calibration"] == "percentile"
    assert history(q)[-1]["step"] == "quantize" and not is_quantized(m)  # the input model is left alone
    out = tmp_path / "q.onnx"
    s = carve.quantize_file(model, out, calib, keep_fp32=["/fc/Gemm"])
    assert [k["node"] for k in s["kept_fp32"]] == ["/fc/Gemm"] and is_quantized(load(out))


def test_a_quantized_model_counts_its_int8_weights_as_parameters(model, digits_rgb):
    import carve
    from carve.pipeline.graph.cost import model_cost
    from carve.pipeline.graph.fold import fold_batchnorms

    m = carve.load(model)
    q, _ = carve.quantize(m, carve.load_data(digits_rgb["train"], model=m, samples=32))
    folded, _, _ = fold_batchnorms(m)  # quantization folds BN first: the same weights, as INT8, plus no scales
    assert model_cost(q).params == model_cost(folded).params > 0
    assert model_cost(q).macs == model_cost(m).macs


@pytest.mark.shared
@pytest.mark.slow
def test_the_readme_quantization_commands_run(tmp_path, monkeypatch, capsys):
    """The README's Quantization block, as written (bench lines with short measurements)."""
    import re
    import shlex

    from conftest import REPO

    from carve.pipeline.data.shared import shared_dir

    shared = shared_dir()
    if shared is None or not (shared / "data" / "cifar10" / "train_subset.npz").exists():
        pytest.skip("the block reads ../shared/data/cifar10 (set CARVE_SHARED or put the data at ../shared)")
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "carve quantize" in b)
    if "openvino" in block:
        pytest.importorskip("openvino", reason="the block benches on OpenVINO (pip install 'carve[openvino]')")
    monkeypatch.chdir(tmp_path)
    for line in [ln for ln in block.splitlines() if ln.strip()]:
        args = shlex.split(line.split("  #")[0].replace("../shared", str(shared)))
        if args[1] == "bench":
            args += ["--rounds", "3", "--min-round-ms", "5", "--warmup-ms", "10", "--no-memory"]
        assert main(args[1:]) == 0, line
    out = capsys.readouterr().out
    assert "top-1 FP32" in out and "integer kernels" in out
    assert is_quantized(load(tmp_path / "r20_p_int8.onnx"))
