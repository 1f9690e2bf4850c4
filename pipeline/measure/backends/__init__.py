"""Engines: one small interface over ONNX Runtime, TensorRT and the PyTorch runner.

A :class:`Backend` says whether it can run here (and why not) and builds an :class:`Engine` for a model, a batch size
and a precision. An engine has its inputs bound once, runs one inference with :meth:`Engine.run`, times ``n`` of them
with the clock that fits its device (:meth:`Engine.time`: wall clock on the CPU, CUDA events on a GPU), returns its
outputs for agreement checks, and reports what it knows about memory and its own settings.

    from carve.pipeline.measure.backends import build
    engine = build("ort", "model.onnx", EngineConfig(batch=8, threads=2))
    seconds = engine.time(100) / 100

Backends: ``ort`` (CPU everywhere; CUDA / TensorRT execution providers where they load), ``trt`` (TensorRT 10/11,
``tensorrt`` imported only in :mod:`carve.pipeline.measure.backends.trt`), ``torch-cuda`` (the ONNX graph run by PyTorch
on a GPU), ``torch-cpu`` (the same runner on the CPU, for numerics and machines without a GPU) and ``openvino``
(OpenVINO's CPU plugin, ``openvino`` imported only in :mod:`carve.pipeline.measure.backends.openvino`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from carve.pipeline.errors import CarveError, MissingDependencyError
from carve.pipeline.registry import Registry

backends: Registry[type[Backend]] = Registry(
    "backend",
    entry_point_group="carve.backends",
    builtin_modules=[
        "carve.pipeline.measure.backends.ort",
        "carve.pipeline.measure.backends.trt",
        "carve.pipeline.measure.backends.torch_cuda",
        "carve.pipeline.measure.backends.openvino",
    ],
)


@dataclass
class EngineConfig:
    batch: int = 1
    precision: str = "fp32"  # fp32 | fp16
    threads: int = 1  # CPU threads (intra-op)
    device: str = "cpu"  # ort: cpu | cuda | tensorrt
    cuda_graphs: bool | None = None  # None: the backend's default (on for torch-cuda and trt, off for ort)
    channels_last: bool | None = None  # torch: None = on for CUDA, off on the CPU
    compile: bool = False  # torch: torch.compile (inductor) the runner's static program
    provider_options: dict[str, str] = field(default_factory=dict)  # ort: options for the GPU execution provider
    optimization: str = "all"  # ort graph optimisation level: disable | basic | extended | all
    memory_arena: bool = True  # ort: disable when measuring peak memory
    spinning: bool = False  # ort: let idle intra-op threads spin (steals CPU from the other model of an A/B)
    workspace_mb: int = 1024  # trt builder workspace
    builder_level: int = 3  # trt builder optimisation level (0-5)
    cache_dir: str | None = None  # trt engine and timing caches
    seed: int = 0
    clock: str = "wall"  # CPU engines: wall | cpu (the calling thread's CPU time; one thread only) | auto
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def cpu_clock(self) -> bool:
        """Whether CPU runs are timed by the thread's CPU time: asked for (``cpu``), or ``auto`` with one thread.

        With one intra-op thread the engine computes on the calling thread, so its CPU time is the run's latency
        minus the time the OS gave to other processes: on an idle machine the same as the wall clock, on a shared one
        far steadier (docs/latency.md has the measurement). With more threads it would add the threads up."""
        if self.clock == "wall" or self.device != "cpu":
            return False
        if self.clock not in ("cpu", "auto"):
            raise CarveError(f"clock must be wall, cpu or auto, got {self.clock!r}")
        if self.threads != 1:
            if self.clock == "cpu":
                raise CarveError("the cpu clock times one thread; with `threads` > 1 use the wall clock")
            return False
        return True


class Engine:
    """A built engine with bound inputs. Subclasses implement :meth:`run` and may override the rest."""

    clock: ClassVar[str] = "wall"
    config: EngineConfig | None = None

    def _timer(self):
        cfg = self.config
        return time.thread_time if cfg is not None and cfg.cpu_clock() else time.perf_counter

    def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def time(self, n: int) -> float:
        """Seconds for ``n`` runs, back to back."""
        timer = self._timer()
        t0 = timer()
        for _ in range(n):
            self.run()
        return timer() - t0

    def times(self, n: int) -> np.ndarray:
        """Per-run seconds of ``n`` runs (for percentiles)."""
        timer = self._timer()
        out = np.empty(n)
        for k in range(n):
            t0 = timer()
            self.run()
            out[k] = timer() - t0
        return out

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def memory(self) -> dict[str, int]:
        return {}

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class Backend:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def available(self) -> tuple[bool, str]:
        """(usable here, why not)."""
        return True, ""

    def build(self, model: str | Path, config: EngineConfig) -> Engine:  # pragma: no cover - interface
        raise NotImplementedError

    def require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise MissingDependencyError(f"backend {self.name!r} cannot run here: {why}")


# what an engine's info() says it applied that both engines of a comparison must share
SHARED_SETTINGS = ("precision", "fp16_graph", "cuda_graphs", "channels_last", "compile", "program", "providers")


def settings_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The applied settings in which two engines' ``info()`` differ (an A/B between them would not compare models)."""
    out = []
    for key in SHARED_SETTINGS:
        if (key in a or key in b) and a.get(key) != b.get(key):
            why = [
                f"{k.upper()}: {i['cuda_graphs_fallback']}"
                for k, i in (("a", a), ("b", b))
                if "cuda_graphs_fallback" in i
            ]
            out.append(f"{key}: A {a.get(key)!r}, B {b.get(key)!r}" + (f" ({'; '.join(why)})" if why else ""))
    return out


def get(name: str) -> Backend:
    return backends.get(name)()


def build(name: str, model: str | Path, config: EngineConfig | None = None) -> Engine:
    b = get(name)
    b.require()
    return b.build(model, config or EngineConfig())
