"""ONNX Runtime engines: the CPU provider everywhere; CUDA and TensorRT execution providers where they load.

Thread counts are fixed (``threads`` intra-op, one inter-op thread, sequential execution) and the graph optimisation
level is recorded, so two models are measured under the same conditions. ``memory_arena=False`` disables the CPU
arena, which otherwise keeps peak memory after the first run.

What the engine reports is what ran:

* ``precision="fp16"`` runs carve's own FP16 graph (:func:`carve.pipeline.graph.precision.to_fp16`: FP16 weights and
  compute, FP32 inputs and outputs). ONNX Runtime runs an FP16 op it has no FP16 kernel for in FP32 between inserted
  casts; those ops are listed in ``info()["fp32_fallback_ops"]`` (from the optimised graph ORT writes), so an "fp16"
  figure says how much of it was not;
* a QDQ (INT8) model on the CPU: ``info()["int8_kernels"]`` counts the integer kernels (QLinearConv, QGemm, ...)
  and the float compute ops in the optimised graph ORT writes
  (:func:`carve.pipeline.graph.precision.kernel_census`), so an "INT8" figure says whether integer kernels ran;
* provider options are built by :func:`provider_options` — CUDA EP: cuDNN convolution algorithm search
  (``EXHAUSTIVE`` unless told otherwise), ``enable_cuda_graph``; TensorRT EP: FP16, engine cache, timing cache, CUDA
  graphs, workspace, builder optimisation level, one optimisation profile for the batch — plus the user's
  ``provider_options``; after the session is made, :func:`check_applied` compares them with the session's own
  ``get_provider_options()``: a setting the session did not take is an error, and ``info()`` records the session's
  effective providers and options, never the requested ones;
* CUDA graphs exist only on the CUDA and TensorRT providers: asked for on the CPU it is a clear error. With CUDA graphs
  the inputs and outputs are bound once to fixed device buffers (IO binding), as ONNX Runtime requires.

The available-providers list is not trusted (the GPU build lists CUDA and TensorRT even where they cannot load): a
session's ``get_providers()`` decides.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from carve.pipeline.errors import CarveError, MissingDependencyError, first_line
from carve.pipeline.measure.backends import Backend, Engine, EngineConfig, backends
from carve.pipeline.runtime.ort import input_specs

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# options whose effective value the session must report as requested (paths and shapes are echoed verbatim or not at
# all by different versions: they are recorded, not compared)
CHECKED = {
    "cudnn_conv_algo_search",
    "enable_cuda_graph",
    "trt_fp16_enable",
    "trt_engine_cache_enable",
    "trt_timing_cache_enable",
    "trt_cuda_graph_enable",
    "trt_builder_optimization_level",
    "trt_max_workspace_size",
}
ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")


def _flag(on: bool) -> str:
    return "1" if on else "0"


def ort_cache_dir(config: EngineConfig) -> Path:
    base = config.cache_dir or os.environ.get("CARVE_CACHE") or Path.home() / ".cache" / "carve"
    return Path(base) / "ort-tensorrt"


def provider_options(
    config: EngineConfig, shapes: dict[str, tuple[int, ...]] | None = None
) -> list[tuple[str, dict[str, str]]]:
    """The providers (in priority order) and the options carve passes to each, for ``config`` (no GPU needed).
    ``shapes`` (input name -> shape) gives the TensorRT EP its one optimisation profile."""
    device = config.device
    if device not in PROVIDERS:
        raise CarveError(f"ONNX Runtime device must be one of {', '.join(PROVIDERS)}, got {device!r}")
    user = {str(k): str(v) for k, v in (config.provider_options or {}).items()}
    if device == "cpu":
        if config.cuda_graphs:
            raise CarveError(
                "CUDA graphs exist only on ONNX Runtime's CUDA and TensorRT providers, not on the CPU",
                hint="use `device=cuda` or `device=tensorrt`, or `cuda_graphs=false`",
            )
        if user:
            raise CarveError(f"provider options {sorted(user)} are for the GPU providers; `device=cpu` takes none")
        return [("CPUExecutionProvider", {})]
    graphs = bool(config.cuda_graphs)  # off unless asked for: ORT's CUDA graphs need every node on the GPU provider
    cuda = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": _flag(graphs)}
    if device == "cuda":
        cuda.update(user)
        search = cuda["cudnn_conv_algo_search"]
        if search.upper() not in ALGO_SEARCH:
            raise CarveError(f"cudnn_conv_algo_search must be one of {', '.join(ALGO_SEARCH)}, got {search!r}")
        return [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]
    cache = ort_cache_dir(config)
    trt = {
        "device_id": "0",
        "trt_fp16_enable": _flag(config.precision == "fp16"),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache / "engines"),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache / "timing"),
        "trt_cuda_graph_enable": _flag(graphs),
        "trt_max_workspace_size": str(int(config.workspace_mb) << 20),
        "trt_builder_optimization_level": str(config.builder_level),
    }
    if shapes:
        profile = ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())
        for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
            trt[key] = profile
    trt.update(user)
    fallback = {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE", "enable_cuda_graph": "0"}
    return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", fallback), ("CPUExecutionProvider", {})]


def _norm(v: object) -> str:
    s = str(v).strip()
    return {"true": "1", "false": "0"}.get(s.lower(), s.upper() if s.isalpha() else s)


def check_applied(requested: list[tuple[str, dict[str, str]]], effective: dict[str, dict[str, str]]) -> list[str]:
    """Options of the session's first provider that it reports differently from what was asked. Raises when it did
    not take one; returns the checked options it does not report (they are then not claimed)."""
    provider, wanted = requested[0]
    got = effective.get(provider, {})
    wrong, unreported = [], []
    for key, value in wanted.items():
        if key not in CHECKED:
            continue
        if key not in got:
            unreported.append(key)
        elif _norm(got[key]) != _norm(value):
            wrong.append(f"{key}={got[key]!r} (asked for {value!r})")
    if wrong:
        raise CarveError(
            f"ONNX Runtime's {provider} did not apply {', '.join(wrong)}",
            hint="this onnxruntime build may not support the option; leave it out",
        )
    return unreported


def output_shapes(proto, batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Graph outputs with concrete shapes for this batch size (shape inference with the inputs fixed), for binding
    fixed output buffers; raises when a dimension stays unknown."""
    import onnx
    from onnx import helper

    from carve.pipeline.graph.shapes import skeleton

    sk = skeleton(proto)
    specs = input_specs(proto, batch)
    for vi in sk.graph.input:
        if vi.name in specs:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, specs[vi.name][0]):
                d.Clear()
                d.dim_value = int(v)
    inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    out = {}
    for vi in inferred.graph.output:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if not tt.HasField("shape") or any(d is None or d <= 0 for d in dims):
            raise CarveError(f"output {vi.name!r}: its shape for batch {batch} cannot be inferred ({dims})")
        out[vi.name] = (tuple(dims), np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return out


INSERTED_CAST = "InsertedPrecisionFreeCast_"  # how ONNX Runtime names the casts around an op it runs in FP32


def fallback_ops(optimized) -> list[str]:
    """Op types ONNX Runtime runs in FP32 inside an FP16 graph: the consumers of the casts it inserted."""
    nodes = optimized.graph.node
    casts = {n.output[0] for n in nodes if n.name.startswith(INSERTED_CAST)}
    return sorted({n.op_type for n in nodes if not n.name.startswith(INSERTED_CAST) and set(n.input) & casts})


def missing_provider_hint(provider: str) -> str:
    """What to do when ``provider`` did not load: install ONNX Runtime's GPU build only when the build in use lacks
    the provider; when it has it, say that it found no usable GPU stack here."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return "install onnxruntime-gpu (in place of onnxruntime) with a CUDA that matches it, or use `device=cpu`"
    return (
        f"this ONNX Runtime {ort.__version__} has the {provider.removesuffix('ExecutionProvider')} provider but found "
        "no usable GPU here (no NVIDIA GPU or driver, or the CUDA/cuDNN libraries it was built for are missing); "
        "use `device=cpu`"
    )


class OrtEngine(Engine):
    def __init__(self, model: str | Path, config: EngineConfig) -> None:
        import onnx
        import onnxruntime as ort

        from carve.pipeline.graph import load

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
        if config.precision not in ("fp32", "fp16"):
            raise CarveError(f"ONNX Runtime precision must be fp32 or fp16, got {config.precision!r}")
        self.config = config
        proto = onnx.load(str(model), load_external_data=False)
        specs = input_specs(proto, config.batch, strict=True)  # never measure one batch and label it another
        requested = provider_options(config, {n: s for n, (s, _) in specs.items()})
        provider = requested[0][0]
        if provider == "TensorrtExecutionProvider":
            for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
                Path(requested[0][1][key]).mkdir(parents=True, exist_ok=True)
        source: str | bytes = str(model)
        self.fp32_fallback: list[str] | None = None
        self.int8_kernels: dict | None = None
        from carve.pipeline.graph.precision import is_quantized

        quantized = is_quantized(proto)
        with tempfile.TemporaryDirectory(prefix="carve-ort-") as tmp:
            if quantized and provider == "CPUExecutionProvider":  # which integer kernels the QDQ pairs became
                so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            if config.precision == "fp16":
                from carve.pipeline.graph.precision import to_fp16

                source = to_fp16(load(model)).SerializeToString()
                if provider != "TensorrtExecutionProvider":  # TensorRT's compiled nodes cannot be written out
                    so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
            try:
                if provider != "CPUExecutionProvider":
                    # a GPU provider that cannot load is logged by ORT's default logger in many red lines before
                    # carve's one-line error below; keep them out (carve says what failed)
                    ort.set_default_logger_severity(4)
                try:
                    self.session = ort.InferenceSession(
                        source, so, providers=[p for p, _ in requested], provider_options=[o for _, o in requested]
                    )
                finally:
                    ort.set_default_logger_severity(3)
            except Exception as exc:
                raise CarveError(
                    f"{model}: ONNX Runtime could not build a {provider} session with {config.precision} "
                    f"(cuda_graphs={bool(config.cuda_graphs)}): {first_line(exc)}"
                ) from None
            if self.session.get_providers()[0] != provider:
                raise MissingDependencyError(
                    f"ONNX Runtime could not load {provider} here (session runs on {self.session.get_providers()})",
                    hint=missing_provider_hint(provider),
                )
            self._read_optimized(so.optimized_model_filepath, quantized)
        self.effective = {k: dict(v) for k, v in self.session.get_provider_options().items()}
        self.unreported = check_applied(requested, self.effective)
        self.cuda_graphs = bool(config.cuda_graphs) and provider != "CPUExecutionProvider"
        if self.cuda_graphs and any(
            k in self.unreported for k in ("enable_cuda_graph", "trt_cuda_graph_enable")
        ):  # not confirmed by the session: not claimed
            self.cuda_graphs = False
        rng = np.random.default_rng(config.seed)
        self.feeds = {
            n: rng.standard_normal(s).astype(d) if np.issubdtype(d, np.floating) else np.zeros(s, d)
            for n, (s, d) in specs.items()
        }
        self.gpu = provider != "CPUExecutionProvider"
        if self.gpu:
            self.binding = self.session.io_binding()
            self.device_inputs = {}
            for name, value in self.feeds.items():
                self.device_inputs[name] = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                self.binding.bind_ortvalue_input(name, self.device_inputs[name])
            if config.cuda_graphs:  # fixed output buffers: a replayed graph writes where it was captured
                self.device_outputs = {
                    name: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", 0)
                    for name, (shape, dtype) in output_shapes(proto, config.batch).items()
                }
                for name, value in self.device_outputs.items():
                    self.binding.bind_ortvalue_output(name, value)
            else:
                for out in self.session.get_outputs():
                    self.binding.bind_output(out.name, "cuda")

    def _read_optimized(self, path: str, quantized: bool) -> None:
        """What the optimised graph ORT wrote says: FP16 ops run in FP32, integer kernels of a QDQ model."""
        import onnx

        from carve.pipeline.graph.precision import kernel_census

        if not path or not Path(path).is_file():
            return
        optimized = onnx.load(path, load_external_data=False)
        if self.config.precision == "fp16":
            self.fp32_fallback = fallback_ops(optimized)
        if quantized:
            self.int8_kernels = kernel_census(optimized)

    def run(self) -> None:
        if self.gpu:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(None, self.feeds)

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self.gpu:
            return self.session.run(None, feeds)
        # through the bound buffers: with CUDA graphs that is the replayed graph, the path that is timed
        for name, value in feeds.items():
            self.device_inputs[name].update_inplace(np.ascontiguousarray(value, dtype=self.feeds[name].dtype))
        self.run()
        return [np.asarray(v.numpy()) for v in self.binding.get_outputs()]

    def info(self) -> dict:
        import onnxruntime as ort

        d = {
            "providers": self.session.get_providers(),
            "provider_options": self.effective,
            "precision": self.config.precision,
            "fp16_graph": self.config.precision == "fp16",
            "cuda_graphs": self.cuda_graphs,
            "optimization": self.config.optimization,
            "threads": self.config.threads,
            "spinning": self.config.spinning,
            "onnxruntime": ort.__version__,
            "io_binding": self.gpu,
        }
        if self.fp32_fallback is not None:
            d["fp32_fallback_ops"] = self.fp32_fallback
        if self.int8_kernels is not None:
            d["int8_kernels"] = self.int8_kernels
        if self.unreported:
            d["options_not_reported"] = self.unreported
        return d


@backends.register("ort")
class OrtBackend(Backend):
    description = "ONNX Runtime (CPU provider; CUDA/TensorRT providers with device cuda|tensorrt)"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return False, f"onnxruntime is not importable ({exc})"
        return True, ""

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return OrtEngine(model, config)
