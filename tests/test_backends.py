"""Engines: every ONNX Runtime path on the CPU, the PyTorch runner's numerics against ONNX Runtime, TensorRT's
GPU-free parts (build plan, cache keys, FP16 graphs), and clear errors where a backend cannot run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import pipeline as P
from pipeline.errors import CarveError, MissingDependencyError
from pipeline.measure.backends import EngineConfig, backends, build, get
from pipeline.measure.backends.trt import build_plan, engine_key
from pipeline.runtime.ort import random_feeds, run


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended", "all"])
@pytest.mark.parametrize("arena", [True, False])
def test_ort_cpu_engine(zoo_dir, optimization, arena):
    e = build(
        "ort",
        zoo_dir / "resnet20.onnx",
        EngineConfig(batch=4, threads=2, optimization=optimization, memory_arena=arena),
    )
    assert e.time(3) > 0 and len(e.times(5)) == 5
    info = e.info()
    assert info["providers"] == ["CPUExecutionProvider"] and info["optimization"] == optimization
    feeds = random_feeds(P.load(zoo_dir / "resnet20.onnx"), batch=4)
    np.testing.assert_allclose(e.outputs(feeds)[0], run(zoo_dir / "resnet20.onnx", feeds)[0], rtol=1e-4, atol=1e-5)


def test_ort_gpu_provider_that_cannot_load_is_a_clear_error(zoo_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for machines without one")
    with pytest.raises(MissingDependencyError, match="could not load CUDAExecutionProvider"):
        build("ort", zoo_dir / "lenet5.onnx", EngineConfig(device="cuda"))


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v3_small", "unet", "detector"])
def test_torch_cpu_matches_ort(zoo_dir, name):
    path = zoo_dir / f"{name}.onnx"
    e = build("torch-cpu", path, EngineConfig(batch=2, threads=1))
    feeds = random_feeds(P.load(path), batch=2, seed=4)
    for a, b in zip(run(path, feeds), e.outputs(feeds)):
        np.testing.assert_allclose(b, a, atol=1e-4 * max(float(np.abs(a).max()), 1e-3))
    assert e.time(2) > 0 and e.clock == "wall"


def test_torch_cpu_fp16(zoo_dir):
    path = zoo_dir / "resnet20.onnx"
    e = build("torch-cpu", path, EngineConfig(batch=2, precision="fp16"))
    feeds = random_feeds(P.load(path), batch=2, seed=5)
    ref = run(path, feeds)[0]
    out = e.outputs(feeds)[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_registry_and_availability():
    assert set(backends.names()) >= {"ort", "trt", "torch-cuda", "torch-cpu"}
    ok, why = get("ort").available()
    assert ok
    import torch

    if not torch.cuda.is_available():
        ok, why = get("torch-cuda").available()
        assert not ok and "CUDA" in why
        with pytest.raises(MissingDependencyError, match="cannot run here"):
            build("torch-cuda", "x.onnx")
    with pytest.raises(CarveError, match="unknown backend 'tvm'"):
        get("tvm")


def test_trt_missing_is_explained():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except Exception:
        pass
    ok, why = get("trt").available()
    assert not ok and "TensorRT is not installed" in why


def test_trt_build_plan_translates_the_config():
    plan = build_plan(EngineConfig(batch=8, precision="fp16", workspace_mb=512, builder_level=5), "10.13.0")
    assert plan.fp16_graph and plan.strongly_typed_flag and plan.workspace_bytes == 512 << 20
    assert plan.batch == 8 and plan.builder_level == 5
    plan11 = build_plan(EngineConfig(precision="fp32"), "11.4.1")
    assert not plan11.fp16_graph
    with pytest.raises(MissingDependencyError, match="too old"):
        build_plan(EngineConfig(), "8.6.1")
    with pytest.raises(CarveError, match="fp32 or fp16"):
        build_plan(EngineConfig(precision="int8"), "10.0.0")
    with pytest.raises(CarveError, match="0-5"):
        build_plan(EngineConfig(builder_level=7), "10.0.0")


def test_trt_engine_cache_key_changes_with_everything_that_matters():
    plan = build_plan(EngineConfig(batch=1), "10.13.0")
    k = engine_key(b"model", "10.13.0", "NVIDIA H100", plan)
    assert k == engine_key(b"model", "10.13.0", "NVIDIA H100", plan)
    assert k != engine_key(b"model2", "10.13.0", "NVIDIA H100", plan)
    assert k != engine_key(b"model", "11.0.0", "NVIDIA H100", plan)
    assert k != engine_key(b"model", "10.13.0", "NVIDIA L4", plan)
    assert k != engine_key(b"model", "10.13.0", "NVIDIA H100", build_plan(EngineConfig(batch=8), "10.13.0"))
    assert k != engine_key(b"model", "10.13.0", "NVIDIA H100", build_plan(EngineConfig(precision="fp16"), "10.13.0"))


def test_fp16_graph_keeps_fp32_io_and_computes_in_fp16(zoo_dir):
    import torch

    from pipeline.graph import from_proto
    from pipeline.graph.precision import to_fp16
    from pipeline.runtime.torch_graph import TorchGraph

    for name in ("resnet20", "unet", "mobilenet_v3_small"):
        m = P.load(zoo_dir / f"{name}.onnx")
        p16 = to_fp16(m)
        onnx.checker.check_model(p16, full_check=True)
        assert p16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert p16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        conv_w = next(t for t in p16.graph.initializer if t.dims and len(t.dims) == 4)
        assert conv_w.data_type == onnx.TensorProto.FLOAT16
        feeds = random_feeds(m, batch=2, seed=6)
        ref = run(m, feeds)[0]
        out = TorchGraph(from_proto(p16))(torch.from_numpy(feeds["input"])).detach().numpy()
        assert out.dtype == np.float32
        assert np.abs(out - ref).max() < 0.05 * max(np.abs(ref).max(), 1e-3), name


@pytest.mark.gpu
def test_trt_engine_on_a_gpu(zoo_dir, tmp_path):
    ok, why = get("trt").available()
    if not ok:
        pytest.skip(f"TensorRT engine test: {why}")
    e = build("trt", zoo_dir / "resnet20.onnx", EngineConfig(batch=4, precision="fp16", cache_dir=str(tmp_path)))
    feeds = random_feeds(P.load(zoo_dir / "resnet20.onnx"), batch=4)
    ref = run(zoo_dir / "resnet20.onnx", feeds)[0]
    assert np.abs(e.outputs(feeds)[0] - ref).max() < 0.05 * np.abs(ref).max()
    assert e.memory()["device_memory_bytes"] > 0 and e.time(10) > 0


@pytest.mark.gpu
def test_torch_cuda_engine(zoo_dir):
    ok, why = get("torch-cuda").available()
    if not ok:
        pytest.skip(f"torch-cuda engine test: {why}")
    e = build("torch-cuda", zoo_dir / "resnet20.onnx", EngineConfig(batch=4, cuda_graphs=True))
    feeds = random_feeds(P.load(zoo_dir / "resnet20.onnx"), batch=4)
    ref = run(zoo_dir / "resnet20.onnx", feeds)[0]
    np.testing.assert_allclose(e.outputs(feeds)[0], ref, atol=1e-3 * np.abs(ref).max())
    assert e.time(10) > 0 and e.clock == "cuda-events"


@pytest.mark.parametrize("spinning", [False, True])
def test_ort_spinning_is_configured_and_recorded(zoo_dir, spinning):
    e = build("ort", zoo_dir / "lenet5.onnx", EngineConfig(batch=1, threads=2, spinning=spinning))
    entry = e.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert entry == ("1" if spinning else "0") and e.info()["spinning"] is spinning
