"""OpenVINO engines (the ``openvino`` package from PyPI, CPU plugin). ``openvino`` is imported only when an engine is
built or availability is asked: the rest of carve works without it (``pip install 'carve[openvino]'``).

What is set, and what is recorded as applied (read back from the compiled model, never assumed):

* ``INFERENCE_NUM_THREADS`` = ``threads``, ``NUM_STREAMS`` = 1 and ``PERFORMANCE_HINT`` = ``LATENCY``, so the two models
  of an A/B run under the same conditions as ONNX Runtime's engines (one request at a time);
* ``INFERENCE_PRECISION_HINT``: ``f32`` for ``precision="fp32"``, ``f16`` for ``"fp16"``. The CPU plugin runs what the
  CPU supports: on a CPU without native FP16 arithmetic it picks ``bf16`` (AVX-512 BF16 / AMX) or stays ``f32``; the
  precision read back is what ``info()["inference_precision"]`` reports;
* a QDQ INT8 model (``carve quantize``) needs no setting: OpenVINO's low-precision transformations turn its
  QuantizeLinear/DequantizeLinear pairs into INT8 kernels. ``info()["runtime_precisions"]`` counts the executed
  layers by the precision they ran in (from the runtime model's ``runtimePrecision``), so "INT8" is checked.

A dynamic batch is fixed to the engine's batch with ``reshape`` before compiling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError, MissingDependencyError, first_line
from carve.pipeline.measure.backends import Backend, Engine, EngineConfig, backends
from carve.pipeline.runtime.ort import input_specs

INSTALL_HINT = "pip install 'carve[openvino]' (or: pip install openvino)"
PRECISION_HINTS = {"fp32": "f32", "fp16": "f16"}


def compile_config(config: EngineConfig) -> dict[str, Any]:
    """The properties carve passes to ``compile_model`` for ``config`` (no OpenVINO needed)."""
    if config.device != "cpu":
        raise CarveError(f"the openvino backend runs on the CPU plugin only, got `device={config.device}`")
    if config.precision not in PRECISION_HINTS:
        raise CarveError(f"OpenVINO precision must be fp32 or fp16, got {config.precision!r}")
    if config.cuda_graphs:
        raise CarveError("CUDA graphs do not exist on OpenVINO's CPU plugin", hint="leave `cuda_graphs` off")
    return {
        "INFERENCE_NUM_THREADS": int(config.threads),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": PRECISION_HINTS[config.precision],
    }


def _text(value: Any) -> str:
    s = str(value)
    return s.split("'")[1] if s.startswith("<Type: '") else s  # <Type: 'float32'> -> float32


def runtime_precisions(compiled) -> dict[str, dict[str, int]]:
    """Executed layer type -> {precision it ran in: count}, from the compiled model's runtime graph (constants,
    inputs and outputs left out)."""
    out: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        kind = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if kind in ("Const", "Input", "Output", "Parameter", "Result"):
            continue
        prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
        out.setdefault(kind, {})
        out[kind][prec] = out[kind].get(prec, 0) + 1
    return dict(sorted(out.items()))


def integer_layers(precisions: dict[str, dict[str, int]]) -> dict[str, int]:
    """Layers of the compute types (Convolution, FullyConnected, MatMul) that ran in u8/i8."""
    compute = ("Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution")
    return {k: sum(v.get(p, 0) for p in ("u8", "i8")) for k, v in precisions.items() if k in compute}


class OpenVinoEngine(Engine):
    def __init__(self, model: str | Path, config: EngineConfig) -> None:
        import onnx
        import openvino as ov

        self.config = config
        props = compile_config(config)
        proto = onnx.load(str(model), load_external_data=False)
        specs = input_specs(proto, config.batch, strict=True)
        core = ov.Core()
        try:
            net = core.read_model(str(model))
            net.reshape({name: list(shape) for name, (shape, _) in specs.items()})
            self.compiled = core.compile_model(net, "CPU", props)
        except Exception as exc:
            raise CarveError(
                f"{model}: OpenVINO could not compile it for the CPU with {config.precision} ({first_line(exc)})"
            ) from None
        self.requested = props
        self.applied = {k: _text(self.compiled.get_property(k)) for k in props}
        if int(self.applied["INFERENCE_NUM_THREADS"]) != config.threads:
            raise CarveError(
                f"OpenVINO applied INFERENCE_NUM_THREADS={self.applied['INFERENCE_NUM_THREADS']} "
                f"(asked for {config.threads})"
            )
        self.precisions = runtime_precisions(self.compiled)
        self.request = self.compiled.create_infer_request()
        rng = np.random.default_rng(config.seed)
        self.feeds = {
            n: rng.standard_normal(s).astype(d) if np.issubdtype(d, np.floating) else np.zeros(s, d)
            for n, (s, d) in specs.items()
        }
        for name, value in self.feeds.items():
            self.request.set_tensor(name, ov.Tensor(value))
        self.version = ov.__version__

    def run(self) -> None:
        self.request.infer()

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feeds)
        return [np.array(res[o]) for o in self.compiled.outputs]

    def info(self) -> dict:
        return {
            "providers": ["openvino CPU"],
            "precision": self.config.precision,
            "threads": self.config.threads,
            "properties_requested": {k: str(v) for k, v in self.requested.items()},
            "properties_applied": self.applied,
            "inference_precision": self.applied["INFERENCE_PRECISION_HINT"],
            "runtime_precisions": self.precisions,
            "int8_layers": integer_layers(self.precisions),
            "openvino": self.version,
        }

    def close(self) -> None:
        self.request = None
        self.compiled = None


@backends.register("openvino")
class OpenVinoBackend(Backend):
    description = "OpenVINO CPU plugin (FP32, FP16 hint, QDQ INT8); `pip install 'carve[openvino]'`"

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return False, f"the openvino package is not installed ({exc})"
        return True, ""

    def require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise MissingDependencyError(f"backend 'openvino' cannot run here: {why}", hint=INSTALL_HINT)

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return OpenVinoEngine(model, config)
