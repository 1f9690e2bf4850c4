"""The ONNX graph run by PyTorch (:mod:`pipeline.runtime.torch_graph`): ``torch-cuda`` on an NVIDIA GPU without
TensorRT (cuDNN autotuning on, CUDA events, optional CUDA graphs, FP16 by casting parameters and inputs), and
``torch-cpu`` on the CPU (fixed thread count, wall clock), which CI uses to check its numerics against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import CarveError
from pipeline.measure.backends import Backend, Engine, EngineConfig, backends


class TorchEngine(Engine):
    def __init__(self, model: str | Path, config: EngineConfig, device: str) -> None:
        import torch

        from pipeline.graph import load
        from pipeline.runtime.ort import input_specs
        from pipeline.runtime.torch_graph import TorchGraph

        self.torch, self.config, self.device = torch, config, device
        m = load(model)
        self.weight_bytes = m.weight_bytes()
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(config.precision)
        if dtype is None:
            raise CarveError(f"torch backends support fp32 and fp16, not {config.precision!r}")
        if device == "cpu":
            torch.set_num_threads(config.threads)
        else:
            torch.backends.cudnn.benchmark = True
        self.dtype = dtype
        self.graph_module = TorchGraph(m, trainable=False).eval().to(device=device, dtype=dtype)
        rng = np.random.default_rng(config.seed)
        self.inputs = [
            torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(device=device, dtype=dtype)
            for s, _ in input_specs(m.proto, config.batch).values()
        ]
        self.cuda_graph = None
        with torch.no_grad():
            for _ in range(3):  # warm-up: cuDNN picks its algorithms
                self._forward()
        if device != "cpu":
            torch.cuda.synchronize()
            if config.cuda_graphs:
                self.stream = torch.cuda.Stream()
                self.cuda_graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(self.cuda_graph, stream=self.stream):
                    self.static_out = self._forward()

    def _forward(self):
        return self.graph_module(*self.inputs)

    @property
    def clock(self) -> str:  # type: ignore[override]
        return "wall" if self.device == "cpu" else "cuda-events"

    def run(self) -> None:
        torch = self.torch
        with torch.no_grad():
            if self.cuda_graph is not None:
                self.cuda_graph.replay()
            else:
                self._forward()
        if self.device != "cpu":
            torch.cuda.synchronize()

    def time(self, n: int) -> float:
        torch = self.torch
        if self.device == "cpu":
            return super().time(n)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            start.record()
            for _ in range(n):
                if self.cuda_graph is not None:
                    self.cuda_graph.replay()
                else:
                    self._forward()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def times(self, n: int) -> np.ndarray:
        if self.device == "cpu":
            return super().times(n)
        return np.array([self.time(1) for _ in range(n)])

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            xs = [torch.from_numpy(v).to(device=self.device, dtype=self.dtype) for v in feeds.values()]
            out = self.graph_module(*xs)
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().cpu().numpy() for o in out]

    def memory(self) -> dict[str, int]:
        out = {"weights_bytes": self.weight_bytes}
        if self.device != "cpu":
            out["device_memory_bytes"] = int(self.torch.cuda.max_memory_allocated())
        return out

    def info(self) -> dict:
        torch = self.torch
        d = {
            "torch": torch.__version__,
            "device": self.device,
            "precision": self.config.precision,
            "cuda_graphs": self.cuda_graph is not None,
        }
        if self.device != "cpu":
            d["gpu"] = torch.cuda.get_device_name(0)
            d["cudnn_benchmark"] = True
        else:
            d["threads"] = self.config.threads
        return d


@backends.register("torch-cuda")
class TorchCudaBackend(Backend):
    description = "the ONNX graph run by PyTorch on an NVIDIA GPU (no TensorRT needed)"

    def available(self) -> tuple[bool, str]:
        import torch

        if not torch.cuda.is_available():
            return False, "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        return True, ""

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return TorchEngine(model, config, "cuda")


@backends.register("torch-cpu")
class TorchCpuBackend(Backend):
    description = "the ONNX graph run by PyTorch on the CPU (numerics, machines without a GPU)"

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return TorchEngine(model, config, "cpu")
