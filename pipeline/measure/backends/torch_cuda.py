"""The ONNX graph run by PyTorch (:mod:`carve.pipeline.runtime.torch_graph`): ``torch-cuda`` on an NVIDIA GPU without
TensorRT, and ``torch-cpu`` on the CPU (numerics against ONNX Runtime, machines without a GPU).

What is timed is the model, not the interpreter. The runner's *static* program for the engine's input (every shape,
pad and size resolved when it is built, no host traffic in a run) is what runs, and on CUDA by default:

* **CUDA graphs**: the program is captured once and each run is one graph replay, so Python and kernel-launch overhead
  are gone. Where capture is impossible (a model with data-dependent shapes, a capture error) the engine runs the
  program eagerly and says why in ``info()["cuda_graphs_fallback"]``;
* **channels_last** convolution weights and activations (cuDNN's fast layout for convolutions, what a deployment uses);
* **precision as requested**: ``fp16`` converts the weights once (``module.to(float16)``), no autocast per call;
* ``compile=True``: the program through ``torch.compile`` (inductor, full graph), then captured like the default, to
  measure inductor's kernels against the CUDA-graph default.

cuDNN autotuning (``cudnn.benchmark``) and, on the CPU, the thread count are set only while the engine builds or runs
and restored afterwards: two engines, or the caller, see no global change. Device memory is per engine, above what was
allocated before it was built (another engine's weights are not counted): what it holds after warm-up and capture
(``device_resident_bytes``) and its peak over runs with the allocator's peak reset first (``device_memory_bytes``; the
autotuning workspace of the warm-up is not the model's).

:class:`ModuleEngine` is that machinery for any module; ``tools/bench_native.py`` uses it to run torchvision's own
module the same way, to measure the runner's overhead against native PyTorch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.measure.backends import Backend, Engine, EngineConfig, backends


@dataclass(frozen=True)
class TorchSettings:
    """What a torch engine will do, from an EngineConfig and the device (no GPU needed to decide)."""

    device: str  # cpu | cuda
    precision: str  # fp32 | fp16
    cuda_graphs: bool
    channels_last: bool
    compile: bool
    threads: int | None  # CPU threads while it runs (None on CUDA)

    def to_dict(self) -> dict:
        return asdict(self)


def torch_settings(config: EngineConfig, device: str) -> TorchSettings:
    """The settings a torch engine applies: CUDA graphs and channels_last on by default on CUDA, off on the CPU (where
    CUDA graphs do not exist: asking for them is an error)."""
    if config.precision not in ("fp32", "fp16"):
        raise CarveError(f"torch backends support fp32 and fp16, not {config.precision!r}")
    cuda = device != "cpu"
    if not cuda and config.cuda_graphs:
        raise CarveError(
            "CUDA graphs need a CUDA device; the torch-cpu backend runs without them", hint="use `backend=torch-cuda`"
        )
    return TorchSettings(
        device="cuda" if cuda else "cpu",
        precision=config.precision,
        cuda_graphs=cuda if config.cuda_graphs is None else bool(config.cuda_graphs),
        channels_last=cuda if config.channels_last is None else bool(config.channels_last),
        compile=bool(config.compile),
        threads=None if cuda else config.threads,
    )


@contextlib.contextmanager
def engine_state(torch, settings: TorchSettings) -> Iterator[None]:
    """The process-wide settings an engine needs while it builds or runs, restored on exit."""
    old_benchmark = torch.backends.cudnn.benchmark
    old_threads = torch.get_num_threads()
    try:
        if settings.device == "cuda":
            torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms for each convolution shape
        elif settings.threads and settings.threads != old_threads:
            torch.set_num_threads(settings.threads)
        yield
    finally:
        torch.backends.cudnn.benchmark = old_benchmark
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


def memory_baseline(torch, settings: TorchSettings) -> int:
    """Reset the allocator's peak and return what is allocated now: an engine built after this reports its own peak
    above it (call it before moving anything of the engine to the device)."""
    if settings.device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return int(torch.cuda.memory_allocated())


def prepare_module(module, settings: TorchSettings):
    """The module as the settings say: on the device, weights converted to the precision (once), 4-D weights in
    channels_last."""
    import torch

    dtype = torch.float16 if settings.precision == "fp16" else torch.float32
    module = module.to(device=settings.device, dtype=dtype)
    if settings.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def prepare_input(x, settings: TorchSettings):
    import torch

    dtype = torch.float16 if settings.precision == "fp16" else torch.float32
    x = x.to(device=settings.device, dtype=dtype if x.is_floating_point() else x.dtype)
    if settings.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class ModuleEngine(Engine):
    """Runs ``fn(*inputs)`` as the settings say: warm-up, optional torch.compile, CUDA-graph capture (with the reason
    when it is impossible), CUDA-event timing, per-engine peak memory, outputs through the same path that is timed."""

    def __init__(
        self,
        fn: Callable,
        inputs: Sequence[Any],
        settings: TorchSettings,
        *,
        capture_refused: str | None = None,
        weights_bytes: int | None = None,
        extra_info: dict | None = None,
        base_bytes: int = 0,
    ) -> None:
        import torch

        self.torch, self.settings, self.inputs = torch, settings, list(inputs)
        self.base_bytes = base_bytes
        self.weights_bytes = weights_bytes
        self.extra_info = dict(extra_info or {})
        self.cuda = settings.device == "cuda"
        self.graph = None
        self.fallback: str | None = None
        self.compile_seconds: float | None = None
        with engine_state(torch, settings):
            if settings.compile:
                if capture_refused:
                    raise CarveError(f"`compile` needs a static graph: {capture_refused}")
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            self.fn = fn
            t0 = time.perf_counter()
            with torch.no_grad():
                self.out = fn(*self.inputs)  # the first call compiles (inductor) and lets cuDNN pick its algorithms
                if self.cuda:
                    torch.cuda.synchronize()
                if settings.compile:
                    self.compile_seconds = round(time.perf_counter() - t0, 3)
                for _ in range(2):
                    self.out = fn(*self.inputs)
            if self.cuda:
                torch.cuda.synchronize()
                if settings.cuda_graphs:
                    if capture_refused:
                        self.fallback = capture_refused
                    else:
                        self._capture()
        self.resident_bytes = self.peak_bytes = None
        if self.cuda:
            self._memory()

    def _capture(self) -> None:
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
                out = self.fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # the capture itself refused something: run eagerly, say why
            torch.cuda.synchronize()
            self.fallback = f"CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return
        self.graph, self.out = graph, out

    def _memory(self) -> None:
        """What this engine holds (weights, bound buffers, the graph's pool) and its peak while it runs, both above
        what was allocated before it was built; the peak is reset after warm-up so cuDNN's autotuning workspace and
        other engines' runs are not counted."""
        torch = self.torch
        torch.cuda.synchronize()
        self.resident_bytes = int(torch.cuda.memory_allocated() - self.base_bytes)
        torch.cuda.reset_peak_memory_stats()
        with engine_state(torch, self.settings), torch.no_grad():
            for _ in range(2):
                self._once()
        torch.cuda.synchronize()
        self.peak_bytes = int(torch.cuda.max_memory_allocated() - self.base_bytes)

    # -- running ---------------------------------------------------------------------------------------------------
    def _once(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out = self.fn(*self.inputs)

    @property
    def clock(self) -> str:  # type: ignore[override]
        return "cuda-events" if self.cuda else "wall"

    def run(self) -> None:
        torch = self.torch
        with engine_state(torch, self.settings), torch.no_grad():
            self._once()
            if self.cuda:
                torch.cuda.synchronize()

    def time(self, n: int) -> float:
        torch = self.torch
        with engine_state(torch, self.settings), torch.no_grad():
            if not self.cuda:
                t0 = time.perf_counter()
                for _ in range(n):
                    self._once()
                return time.perf_counter() - t0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                self._once()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def times(self, n: int) -> np.ndarray:
        return np.array([self.time(1) for _ in range(n)])

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``feeds`` through the timed path: copied into the bound inputs, then the replayed graph (or the
        same function the timing runs)."""
        torch = self.torch
        values = list(feeds.values())
        if len(values) != len(self.inputs) or any(
            tuple(v.shape) != tuple(t.shape) for v, t in zip(values, self.inputs)
        ):
            raise CarveError(
                f"this engine was built for inputs {[tuple(t.shape) for t in self.inputs]}, "
                f"got {[tuple(v.shape) for v in values]}"
            )
        with engine_state(torch, self.settings), torch.no_grad():
            for t, v in zip(self.inputs, values):
                t.copy_(torch.from_numpy(np.ascontiguousarray(v)))
            self._once()
            out = self.out if isinstance(self.out, (tuple, list)) else (self.out,)
            return [o.float().cpu().numpy() for o in out]

    def memory(self) -> dict[str, int]:
        out = {}
        if self.weights_bytes is not None:
            out["weights_bytes"] = self.weights_bytes
        if self.peak_bytes is not None:
            out["device_memory_bytes"] = self.peak_bytes  # this engine's peak while running, above what was there
            out["device_resident_bytes"] = self.resident_bytes
        return out

    def info(self) -> dict:
        torch = self.torch
        s = self.settings
        d: dict[str, Any] = {
            "torch": torch.__version__,
            "device": s.device,
            "precision": s.precision,
            "cuda_graphs": self.graph is not None,
            "channels_last": s.channels_last,
            "compile": "inductor" if s.compile else False,
            **self.extra_info,
        }
        if s.cuda_graphs and self.graph is None:
            d["cuda_graphs_fallback"] = self.fallback or "not captured"
        if self.compile_seconds is not None:
            d["compile_seconds"] = self.compile_seconds
        if self.cuda:
            d["gpu"] = torch.cuda.get_device_name(0)
            d["cuda"] = torch.version.cuda
            d["cudnn"] = torch.backends.cudnn.version()
            d["cudnn_benchmark"] = True
            d["tf32_conv"] = bool(torch.backends.cudnn.allow_tf32)
            d["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        else:
            d["threads"] = s.threads
        return d


class TorchEngine(ModuleEngine):
    """carve's runner of an ONNX file: a TorchGraph prepared as the settings say, its static program for the engine's
    input (the dynamic mode when the graph has data-dependent shapes, with that reason)."""

    def __init__(self, model: str | Path, config: EngineConfig, device: str) -> None:
        import torch

        from carve.pipeline.graph import load
        from carve.pipeline.runtime.ort import input_specs
        from carve.pipeline.runtime.torch_graph import DataDependent, TorchGraph

        settings = torch_settings(config, device)
        base = memory_baseline(torch, settings)
        m = load(model)
        rng = np.random.default_rng(config.seed)
        with engine_state(torch, settings):
            graph = prepare_module(TorchGraph(m, trainable=False).eval(), settings)
            inputs = [
                prepare_input(torch.from_numpy(rng.standard_normal(s).astype(np.float32)), settings)
                for s, _ in input_specs(m.proto, config.batch).values()
            ]
            refused = None
            try:
                with torch.no_grad():
                    fn = graph.static(*inputs)
            except DataDependent as exc:
                fn, refused = graph, exc.message  # the dynamic mode reads those values back each run
        super().__init__(
            fn,
            inputs,
            settings,
            capture_refused=refused,
            weights_bytes=m.weight_bytes(),
            extra_info={"program": "static"} if refused is None else {"program": "dynamic", "dynamic_reason": refused},
            base_bytes=base,
        )


@backends.register("torch-cuda")
class TorchCudaBackend(Backend):
    description = "the ONNX graph run by PyTorch on an NVIDIA GPU (CUDA graphs, channels_last; no TensorRT needed)"

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
