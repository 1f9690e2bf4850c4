"""ONNX Runtime engines: the CPU provider everywhere; CUDA and TensorRT execution providers where they load.

Thread counts are fixed (``threads`` intra-op, one inter-op thread, sequential execution) and the graph optimisation
level is recorded, so two models are measured under the same conditions. On a GPU provider the inputs and outputs are
bound on the device once (IO binding): a timed run moves no data over PCIe. ``memory_arena=False`` disables the CPU
arena, which otherwise keeps peak memory after the first run. The available-providers list is not trusted (the GPU
build lists CUDA and TensorRT even where they cannot load): a session's ``get_providers()`` decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import MissingDependencyError
from pipeline.measure.backends import Backend, Engine, EngineConfig, backends
from pipeline.runtime.ort import input_specs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


class OrtEngine(Engine):
    def __init__(self, model: str | Path, config: EngineConfig) -> None:
        import onnx
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = config.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[config.optimization])
        so.enable_cpu_mem_arena = config.memory_arena
        # an idle session's pool threads spin-wait after each run; in an A/B on shared cores they steal time from
        # the model being timed, so spinning is off unless asked for
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
        so.log_severity_level = 3
        provider = PROVIDERS[config.device]
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model), so, providers=providers)
        if self.session.get_providers()[0] != provider:
            raise MissingDependencyError(
                f"ONNX Runtime could not load {provider} here (session runs on {self.session.get_providers()})",
                hint="install onnxruntime-gpu with a matching CUDA, or use --device cpu",
            )
        self.config = config
        proto = onnx.load(str(model), load_external_data=False)
        rng = np.random.default_rng(config.seed)
        self.feeds = {
            n: rng.standard_normal(s).astype(d) if np.issubdtype(d, np.floating) else np.zeros(s, d)
            for n, (s, d) in input_specs(proto, config.batch, strict=True).items()
        }
        self.gpu = provider != "CPUExecutionProvider"
        if self.gpu:
            self.binding = self.session.io_binding()
            for name, value in self.feeds.items():
                self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for out in self.session.get_outputs():
                self.binding.bind_output(out.name, "cuda")

    def run(self) -> None:
        if self.gpu:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(None, self.feeds)

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)

    def info(self) -> dict:
        import onnxruntime as ort

        return {
            "providers": self.session.get_providers(),
            "optimization": self.config.optimization,
            "threads": self.config.threads,
            "spinning": self.config.spinning,
            "onnxruntime": ort.__version__,
            "io_binding": self.gpu,
        }


@backends.register("ort")
class OrtBackend(Backend):
    description = "ONNX Runtime (CPU provider; CUDA/TensorRT providers with --device cuda|tensorrt)"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime is not importable ({exc})"
        return True, ""

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return OrtEngine(model, config)
