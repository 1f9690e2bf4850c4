"""On an NVIDIA GPU (each test skips elsewhere, saying why): the replayed CUDA graph computes what ONNX Runtime computes
on the CPU, the engines leave no global state behind and count memory per engine, ONNX Runtime's CUDA provider takes
the options carve passes. No test here asserts on timing: the timing sanity check (a replayed graph beats eager
dispatch at batch 1 on ResNet-18) is measured by ``tools/gpu_check.py``, which also runs this module first.
"""

from __future__ import annotations

import numpy as np
import pytest

import carve as P
from carve.pipeline.errors import MissingDependencyError
from carve.pipeline.measure.backends import EngineConfig, build, get
from carve.pipeline.runtime.ort import random_feeds, run


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# skipped before any fixture is built: on a machine without a GPU, ``pytest -m gpu`` costs seconds
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda(), reason="needs an NVIDIA GPU: torch.cuda.is_available() is False"),
]


def need(backend: str) -> None:
    ok, why = get(backend).available()
    if not ok:
        pytest.skip(f"{backend}: {why}")


def close(out: list[np.ndarray], ref: list[np.ndarray], tol: float) -> None:
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol * max(float(np.abs(a).max()), 1e-3)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["resnet20", "unet", "detector", "resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_replayed_cuda_graph_matches_ort_on_the_cpu(zoo_dir, name, precision):
    """The models whose Pad/Resize broke capture before (CIFAR ResNets, UNet, the detector) and ImageNet ones."""
    need("torch-cuda")
    path = zoo_dir / f"{name}.onnx"
    e = build("torch-cuda", path, EngineConfig(batch=4, precision=precision))
    info = e.info()
    assert info["cuda_graphs"] is True, info.get("cuda_graphs_fallback")
    assert info["channels_last"] and info["program"] == "static" and info["precision"] == precision
    tol = 0.02 if precision == "fp32" else 0.05  # fp32 convolutions run in TF32 by default (recorded in info)
    m = P.load(path)
    for seed in (1, 2):  # a second input through the same graph: it reads the bound buffer, not a stale copy
        feeds = random_feeds(m, batch=4, seed=seed)
        close(e.outputs(feeds), run(path, feeds), tol)


def test_torch_cuda_leaves_no_global_state_and_counts_memory_per_engine(zoo_dir):
    import torch

    need("torch-cuda")
    benchmark = torch.backends.cudnn.benchmark
    big = build("torch-cuda", zoo_dir / "resnet50.onnx", EngineConfig(batch=32))
    small = build("torch-cuda", zoo_dir / "resnet18.onnx", EngineConfig(batch=1))
    small.run()
    assert torch.backends.cudnn.benchmark == benchmark
    mb, ms = big.memory(), small.memory()
    # the small engine's figure does not include the big one's weights and activations
    assert 0.9 * ms["weights_bytes"] < ms["device_resident_bytes"] <= ms["device_memory_bytes"]
    assert ms["device_memory_bytes"] < mb["device_memory_bytes"]


def test_torch_cuda_compile_is_measured_through_the_same_path(zoo_dir):
    need("torch-cuda")
    path = zoo_dir / "resnet20.onnx"
    e = build("torch-cuda", path, EngineConfig(batch=4, compile=True))
    info = e.info()
    assert info["compile"] == "inductor" and info["cuda_graphs"] is True, info.get("cuda_graphs_fallback")
    feeds = random_feeds(P.load(path), batch=4, seed=3)
    close(e.outputs(feeds), run(path, feeds), 0.02)


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_ort_gpu_provider_takes_carves_options(zoo_dir, device, tmp_path):
    need("ort")
    path = zoo_dir / "resnet20.onnx"
    cfg = EngineConfig(batch=4, device=device, cuda_graphs=True, precision="fp16", cache_dir=str(tmp_path))
    try:
        e = build("ort", path, cfg)
    except MissingDependencyError as exc:
        pytest.skip(f"ONNX Runtime {device} provider: {exc.message}")
    info = e.info()
    provider = info["providers"][0]
    key = "enable_cuda_graph" if device == "cuda" else "trt_cuda_graph_enable"
    assert info["cuda_graphs"] and info["provider_options"][provider][key] in ("1", "True", "true")
    feeds = random_feeds(P.load(path), batch=4, seed=4)
    close(e.outputs(feeds), run(path, feeds), 0.05)
