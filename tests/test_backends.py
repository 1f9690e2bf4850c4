"""Engines: every ONNX Runtime path on the CPU, the PyTorch runner's numerics against ONNX Runtime, TensorRT's
GPU-free parts (build plan, cache keys, FP16 graphs), and clear errors where a backend cannot run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import carve as P
from carve.pipeline.errors import CarveError, MissingDependencyError
from carve.pipeline.measure.backends import EngineConfig, backends, build, get
from carve.pipeline.measure.backends.trt import build_plan, engine_key
from carve.pipeline.runtime.ort import random_feeds, run


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

    from carve.pipeline.graph import from_proto
    from carve.pipeline.graph.precision import to_fp16
    from carve.pipeline.runtime.torch_graph import TorchGraph

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
@pytest.mark.skipif(not get("trt").available()[0], reason=f"TensorRT engine test: {get('trt').available()[1]}")
def test_trt_engine_on_a_gpu(zoo_dir, tmp_path):
    e = build("trt", zoo_dir / "resnet20.onnx", EngineConfig(batch=4, precision="fp16", cache_dir=str(tmp_path)))
    feeds = random_feeds(P.load(zoo_dir / "resnet20.onnx"), batch=4)
    ref = run(zoo_dir / "resnet20.onnx", feeds)[0]
    assert e.info()["cuda_graphs"] and e.info()["timing_cache"] in ("new", "loaded")
    assert np.abs(e.outputs(feeds)[0] - ref).max() < 0.05 * np.abs(ref).max()  # through the replayed graph
    assert e.memory()["device_memory_bytes"] > 0 and e.time(10) > 0
    again = build("trt", zoo_dir / "resnet32.onnx", EngineConfig(batch=4, precision="fp16", cache_dir=str(tmp_path)))
    assert again.info()["timing_cache"] == "loaded"


@pytest.mark.parametrize("spinning", [False, True])
def test_ort_spinning_is_configured_and_recorded(zoo_dir, spinning):
    e = build("ort", zoo_dir / "lenet5.onnx", EngineConfig(batch=1, threads=2, spinning=spinning))
    entry = e.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert entry == ("1" if spinning else "0") and e.info()["spinning"] is spinning


# -- ONNX Runtime: what it really ran ---------------------------------------------------------------------------------


def test_ort_fp16_runs_carves_fp16_graph_and_says_what_ran_in_fp32(zoo_dir):
    path = zoo_dir / "resnet20.onnx"
    feeds = random_feeds(P.load(path), batch=2, seed=7)
    e16 = build("ort", path, EngineConfig(batch=2, precision="fp16"))
    e32 = build("ort", path, EngineConfig(batch=2))
    info = e16.info()
    assert info["precision"] == "fp16" and info["fp16_graph"] and not e32.info()["fp16_graph"]
    assert e16.session.get_inputs()[0].type == "tensor(float)"  # FP32 interface, FP16 inside
    assert isinstance(info["fp32_fallback_ops"], list) and "fp32_fallback_ops" not in e32.info()
    out16, out32 = e16.outputs(feeds)[0], e32.outputs(feeds)[0]
    assert 0 < np.abs(out16 - out32).max() < 0.05 * np.abs(out32).max()  # a different (FP16) computation, close


def test_ort_cuda_graphs_on_the_cpu_are_refused(zoo_dir):
    with pytest.raises(CarveError, match="CUDA graphs exist only on ONNX Runtime's CUDA and TensorRT providers"):
        build("ort", zoo_dir / "lenet5.onnx", EngineConfig(cuda_graphs=True))
    assert build("ort", zoo_dir / "lenet5.onnx", EngineConfig()).info()["cuda_graphs"] is False


def test_ort_provider_options_for_each_device(tmp_path):
    from carve.pipeline.measure.backends.ort import provider_options

    assert provider_options(EngineConfig()) == [("CPUExecutionProvider", {})]
    with pytest.raises(CarveError, match="takes none"):
        provider_options(EngineConfig(provider_options={"x": "1"}))
    cuda = provider_options(EngineConfig(device="cuda", cuda_graphs=True))
    assert [p for p, _ in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda[0][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE" and cuda[0][1]["enable_cuda_graph"] == "1"
    user = provider_options(EngineConfig(device="cuda", provider_options={"cudnn_conv_algo_search": "HEURISTIC"}))
    assert user[0][1]["cudnn_conv_algo_search"] == "HEURISTIC" and user[0][1]["enable_cuda_graph"] == "0"
    with pytest.raises(CarveError, match="cudnn_conv_algo_search must be one of"):
        provider_options(EngineConfig(device="cuda", provider_options={"cudnn_conv_algo_search": "FAST"}))
    cfg = EngineConfig(device="tensorrt", precision="fp16", cache_dir=str(tmp_path), workspace_mb=256, builder_level=4)
    trt = provider_options(cfg, {"input": (8, 3, 32, 32)})
    assert [p for p, _ in trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    o = trt[0][1]
    assert o["trt_fp16_enable"] == "1" and o["trt_engine_cache_enable"] == "1" and o["trt_timing_cache_enable"] == "1"
    assert o["trt_engine_cache_path"].startswith(str(tmp_path)) and o["trt_timing_cache_path"].startswith(str(tmp_path))
    assert o["trt_max_workspace_size"] == str(256 << 20) and o["trt_builder_optimization_level"] == "4"
    assert o["trt_cuda_graph_enable"] == "0" and o["trt_profile_opt_shapes"] == "input:8x3x32x32"
    assert trt[1][1]["enable_cuda_graph"] == "0"  # the CUDA fallback partition is not captured
    with pytest.raises(CarveError, match="must be one of cpu, cuda, tensorrt"):
        provider_options(EngineConfig(device="rocm"))


def test_ort_settings_the_session_did_not_take_are_errors_not_records():
    from carve.pipeline.measure.backends.ort import check_applied

    asked = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1"})]
    ok = {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "1", "x": "y"}}
    assert check_applied(asked, ok) == []
    assert check_applied(asked, {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "EXHAUSTIVE"}}) == [
        "enable_cuda_graph"
    ]
    with pytest.raises(CarveError, match=r"did not apply enable_cuda_graph='0' \(asked for '1'\)"):
        check_applied(
            asked, {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "0"}}
        )
    trt = [("TensorrtExecutionProvider", {"trt_fp16_enable": "1", "trt_engine_cache_path": "/a"})]
    assert (
        check_applied(trt, {"TensorrtExecutionProvider": {"trt_fp16_enable": "True", "trt_engine_cache_path": "/b"}})
        == []
    )


def test_ort_output_shapes_and_fp32_fallback_detection(zoo_dir):
    from onnx import helper

    from carve.pipeline.measure.backends.ort import fallback_ops, output_shapes

    proto = P.load(zoo_dir / "resnet20.onnx").proto
    assert output_shapes(proto, 4) == {"logits": ((4, 10), np.dtype("float32"))}
    nodes = [
        helper.make_node("Cast", ["x"], ["c"], name="InsertedPrecisionFreeCast_x", to=1),
        helper.make_node("Pad", ["c", "p"], ["y"], name="pad"),
        helper.make_node("Relu", ["y"], ["z"], name="relu"),
    ]
    g = helper.make_graph(nodes, "g", [], [])
    assert fallback_ops(helper.make_model(g)) == ["Pad"]


# -- TensorRT: timing cache per GPU and version, its load checked ------------------------------------------------------


class FakeBuilderConfig:
    """IBuilderConfig's timing-cache calls: accepts caches whose bytes start with ``good``."""

    def __init__(self, good: bytes = b"good", accept_empty: bool = True) -> None:
        self.good, self.accept_empty, self.attached = good, accept_empty, None

    def create_timing_cache(self, blob: bytes):
        if blob == b"corrupt":
            raise RuntimeError("bad cache")
        return {"blob": blob}

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        ok = cache["blob"].startswith(self.good) or (cache["blob"] == b"" and self.accept_empty)
        if ok:
            self.attached = cache
        return ok


def test_trt_timing_cache_is_keyed_by_gpu_and_version_and_checked(tmp_path):
    from carve.pipeline.measure.backends.trt import attach_timing_cache, timing_cache_path

    p = timing_cache_path(tmp_path, "10.13.0", "NVIDIA H100 80GB HBM3")
    assert p.parent == tmp_path and "10.13.0" in p.name and "nvidia-h100" in p.name
    others = {
        timing_cache_path(tmp_path, v, g) for v, g in [("10.13.0", "NVIDIA L4"), ("11.0.0", "NVIDIA H100 80GB HBM3")]
    }
    assert p not in others and len(others) == 2
    cfg = FakeBuilderConfig()
    assert attach_timing_cache(cfg, p) == "new" and cfg.attached == {"blob": b""}
    p.write_bytes(b"good timings")
    assert attach_timing_cache(cfg, p) == "loaded" and cfg.attached == {"blob": b"good timings"}
    for blob in (b"from another GPU", b"corrupt"):
        p.write_bytes(blob)
        cfg = FakeBuilderConfig()
        assert attach_timing_cache(cfg, p).startswith("rejected") and cfg.attached == {"blob": b""}
    with pytest.raises(CarveError, match="refused an empty timing cache"):
        attach_timing_cache(FakeBuilderConfig(accept_empty=False), tmp_path / "none.cache")


def test_trt_cuda_graphs_default_on_and_can_be_turned_off():
    assert build_plan(EngineConfig(), "10.13.0").cuda_graphs
    assert not build_plan(EngineConfig(cuda_graphs=False), "10.13.0").cuda_graphs


# -- the torch engines: settings, no global side effects, the timed path ----------------------------------------------


def test_torch_settings_defaults_by_device():
    from carve.pipeline.measure.backends.torch_cuda import torch_settings

    cuda = torch_settings(EngineConfig(precision="fp16"), "cuda")
    assert cuda.cuda_graphs and cuda.channels_last and not cuda.compile and cuda.threads is None
    off = torch_settings(EngineConfig(cuda_graphs=False, channels_last=False, compile=True), "cuda")
    assert not off.cuda_graphs and not off.channels_last and off.compile
    cpu = torch_settings(EngineConfig(threads=2), "cpu")
    assert not cpu.cuda_graphs and not cpu.channels_last and cpu.threads == 2
    with pytest.raises(CarveError, match="CUDA graphs need a CUDA device"):
        torch_settings(EngineConfig(cuda_graphs=True), "cpu")
    with pytest.raises(CarveError, match="fp32 and fp16"):
        torch_settings(EngineConfig(precision="int8"), "cuda")


def test_engine_state_is_restored():
    import torch

    from carve.pipeline.measure.backends.torch_cuda import TorchSettings, engine_state

    before = (torch.backends.cudnn.benchmark, torch.get_num_threads())
    cuda = TorchSettings("cuda", "fp16", True, True, False, None)
    with engine_state(torch, cuda):
        assert torch.backends.cudnn.benchmark is True
    cpu = TorchSettings("cpu", "fp32", False, False, False, 1)
    with engine_state(torch, cpu):
        assert torch.get_num_threads() == 1
    assert (torch.backends.cudnn.benchmark, torch.get_num_threads()) == before


def test_torch_cpu_engine_runs_the_static_program_and_leaves_threads_alone(zoo_dir):
    import torch

    threads = torch.get_num_threads()
    path = zoo_dir / "unet.onnx"
    e = build("torch-cpu", path, EngineConfig(batch=2, threads=1, channels_last=True))
    info = e.info()
    assert info["program"] == "static" and info["channels_last"] and info["cuda_graphs"] is False
    assert "cuda_graphs_fallback" not in info and info["compile"] is False
    e.run()
    assert e.time(2) > 0 and torch.get_num_threads() == threads
    feeds = random_feeds(P.load(path), batch=2, seed=8)
    ref = run(path, feeds)[0]
    np.testing.assert_allclose(e.outputs(feeds)[0], ref, atol=1e-4 * np.abs(ref).max())  # channels_last computes alike
    with pytest.raises(CarveError, match=r"built for inputs \[\(2, 3, 64, 64\)\], got \[\(1, 3, 64, 64\)\]"):
        e.outputs(random_feeds(P.load(path), batch=1))


def test_torch_engine_compile_option_traces_the_whole_static_graph(zoo_dir, monkeypatch):
    """--compile hands the static program to torch.compile with fullgraph=True; inductor itself would take minutes on
    this CPU, so the call is redirected to the eager backend here (the GPU check compiles for real)."""
    import torch

    calls = []
    real = torch.compile

    def spy(fn, **kwargs):
        calls.append(kwargs)
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    path = zoo_dir / "resnet20.onnx"
    e = build("torch-cpu", path, EngineConfig(batch=2, compile=True))
    assert calls == [{"fullgraph": True, "dynamic": False}]
    assert e.info()["compile"] == "inductor" and e.info()["compile_seconds"] >= 0
    feeds = random_feeds(P.load(path), batch=2, seed=9)
    np.testing.assert_allclose(e.outputs(feeds)[0], run(path, feeds)[0], atol=1e-4)
    torch._dynamo.reset()


def test_a_comparison_refuses_engines_that_ran_differently(zoo_dir, tmp_path):
    from carve.pipeline.measure.backends import Backend, settings_differ
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    assert settings_differ({"cuda_graphs": True}, {"cuda_graphs": True, "gpu": "x"}) == []
    differ = settings_differ({"cuda_graphs": True}, {"cuda_graphs": False, "cuda_graphs_fallback": "capture failed"})
    assert differ == ["cuda_graphs: A True, B False (B: capture failed)"]

    class Uneven(Backend):
        def build(self, model, config):
            e = build("torch-cpu", model, config)
            if "b" in str(model):
                e.settings = type(e.settings)(**{**e.settings.to_dict(), "channels_last": True})
            return e

    if "uneven" not in backends:
        backends.register("uneven")(Uneven)
    for name in ("a", "b"):
        (tmp_path / f"{name}.onnx").write_bytes((zoo_dir / "lenet5.onnx").read_bytes())
    cfg = MeasureConfig(backend="uneven", rounds=2, min_round_ms=1, warmup_ms=1, memory=False, agreement=False)
    with pytest.raises(CarveError, match="did not run with the same engine settings .channels_last: A False, B True"):
        compare(tmp_path / "a.onnx", tmp_path / "b.onnx", cfg)


def test_report_states_engine_settings_as_applied():
    from carve.pipeline.measure.report import engine_settings

    assert (
        engine_settings({"cuda_graphs": True, "channels_last": True, "compile": False}) == "CUDA graphs, channels_last"
    )
    assert (
        engine_settings(
            {"cuda_graphs": False, "cuda_graphs_fallback": "why", "program": "dynamic", "dynamic_reason": "r"}
        )
        == "no CUDA graphs (why), dynamic program (r)"
    )
    assert engine_settings(
        {"providers": ["CPUExecutionProvider"], "fp16_graph": True, "fp32_fallback_ops": ["Pad"]}
    ) == ("CPUExecutionProvider, FP16 graph, FP32 fallback for Pad")
