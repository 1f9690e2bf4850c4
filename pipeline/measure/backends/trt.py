"""TensorRT engines (TensorRT 10 and 11). ``tensorrt`` is imported here and nowhere else, and only when an engine is
built: the rest of carve works without it.

Build: ONNX parser -> network (strongly typed: mandatory on TensorRT 11, opted into on 10.x) -> builder config
(workspace limit, builder optimisation level, one optimisation profile for the batch size) -> serialised engine.
FP16 means an FP16 graph (:func:`pipeline.precision.to_fp16`), because TensorRT 11 has no FP16 builder flag.
A timing cache shared by all builds on one GPU with one TensorRT version (both models of a comparison) makes kernel
choices comparable and builds fast; its file is keyed by GPU and TensorRT version (:func:`timing_cache_path`) and
``set_timing_cache``'s answer is checked (:func:`attach_timing_cache`: a cache TensorRT rejects is replaced by an empty
one and the report says so). Serialised engines are cached on disk under a key of (model hash, TensorRT version, GPU,
build settings).

Run: device buffers are torch CUDA tensors bound by name (``set_tensor_address``), ``execute_async_v3`` on a torch
stream, CUDA events for timing, the whole run captured in a CUDA graph by default (``cuda_graphs=False`` turns it
off; a capture TensorRT refuses falls back to plain enqueues, with the reason in ``info()``). Memory: serialised
engine size, weight bytes, ``device_memory_size_v2`` (activation memory of an execution context).

The parts that need no GPU (build plan, cache keys, FP16 conversion, report fields) are plain Python and unit-tested
on machines without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carve.pipeline.errors import CarveError, MissingDependencyError
from carve.pipeline.measure.backends import Backend, Engine, EngineConfig, backends


@dataclass(frozen=True)
class BuildPlan:
    """What a TensorRT build needs, derived from an EngineConfig and the TensorRT version (no GPU needed)."""

    precision: str
    fp16_graph: bool  # convert the ONNX graph to FP16 before parsing
    strongly_typed_flag: bool  # pass NetworkDefinitionCreationFlag.STRONGLY_TYPED
    workspace_bytes: int
    builder_level: int
    batch: int
    cuda_graphs: bool
    explicit_int8: bool = False  # a QDQ model: INT8 where its Q/DQ say (strongly typed, no INT8 builder flag)

    def key_fields(self) -> dict:
        return {
            "precision": self.precision,
            "explicit_int8": self.explicit_int8,
            "workspace": self.workspace_bytes,
            "level": self.builder_level,
            "batch": self.batch,
        }


def trt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise CarveError(f"unrecognised TensorRT version {version!r}") from None


def build_plan(config: EngineConfig, trt_version: str, proto=None) -> BuildPlan:
    """The build for ``config`` on this TensorRT version; ``proto`` (the ONNX model) decides explicit INT8: a QDQ
    model is built strongly typed as it is (its Q/DQ layers set the INT8 precision; TensorRT 10+ takes no INT8 flag
    for it), which needs symmetric INT8 Q/DQ (zero point 0: ``carve quantize --activations int8``)."""
    major = trt_major(trt_version)
    if major < 10:
        raise MissingDependencyError(f"TensorRT {trt_version} is too old; carve supports TensorRT 10 and 11")
    if config.precision not in ("fp32", "fp16"):
        raise CarveError(f"TensorRT precision must be fp32 or fp16, got {config.precision!r}")
    if not 0 <= config.builder_level <= 5:
        raise CarveError(f"TensorRT builder optimisation level must be 0-5, got {config.builder_level}")
    explicit = False
    if proto is not None:
        from carve.pipeline.graph.precision import asymmetric_qdq, is_quantized

        explicit = is_quantized(proto)
        bad = asymmetric_qdq(proto) if explicit else []
        if bad:
            raise CarveError(
                f"TensorRT's explicit INT8 needs symmetric INT8 Q/DQ (zero point 0); node {bad[0]!r} "
                f"({len(bad)} in all) has a UINT8 or non-zero zero point",
                hint="quantize for TensorRT with `carve quantize --activations int8`",
            )
        if explicit and config.precision == "fp16":
            raise CarveError(
                "an FP16 graph of a QDQ model is not built (its scales would become FP16)",
                hint="measure the INT8 model with `precision=fp32`: its float parts stay FP32",
            )
    return BuildPlan(
        precision=config.precision,
        fp16_graph=config.precision == "fp16",
        strongly_typed_flag=True,
        workspace_bytes=int(config.workspace_mb) << 20,
        builder_level=config.builder_level,
        batch=config.batch,
        cuda_graphs=True if config.cuda_graphs is None else bool(config.cuda_graphs),
        explicit_int8=explicit,
    )


def engine_key(model_bytes: bytes, trt_version: str, gpu: str, plan: BuildPlan) -> str:
    """Cache key of a serialised engine: it is only valid for the same model, TensorRT, GPU and build settings."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(model_bytes).digest())
    h.update(json.dumps({"trt": trt_version, "gpu": gpu, **plan.key_fields()}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def timing_cache_path(directory: Path, trt_version: str, gpu: str) -> Path:
    """The timing cache file for one GPU model and TensorRT version (timings are only valid there)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()[:40] or "gpu"
    digest = hashlib.sha256(f"{gpu}|{trt_version}".encode()).hexdigest()[:8]
    return Path(directory) / f"timing-trt{trt_version}-{slug}-{digest}.cache"


def attach_timing_cache(builder_config, path: Path) -> str:
    """Give the builder config the timing cache stored at ``path``; returns what happened ("loaded", "new", or
    "rejected ...: rebuilt empty"). ``set_timing_cache`` returns False for a cache from another device or version:
    that is checked, never ignored."""
    blob = path.read_bytes() if path.is_file() else b""
    status = "new"
    if blob:
        try:
            cache = builder_config.create_timing_cache(blob)
        except Exception:  # a truncated or foreign file
            cache = None
        if cache is not None and builder_config.set_timing_cache(cache, ignore_mismatch=False):
            return "loaded"
        status = "rejected (not from this GPU/TensorRT, or damaged): rebuilt empty"
    cache = builder_config.create_timing_cache(b"")
    if cache is None or not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        raise CarveError("TensorRT refused an empty timing cache (set_timing_cache returned False)")
    return status


def cache_dir(config: EngineConfig) -> Path:
    base = config.cache_dir or os.environ.get("CARVE_CACHE") or Path.home() / ".cache" / "carve"
    return Path(base) / "tensorrt"


def _import_trt():
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or the PyPI stub failing to fetch the real package
        raise MissingDependencyError(
            f"TensorRT is not installed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})",
            hint="install TensorRT 10/11 for your CUDA (pip install 'carve[tensorrt]' needs NVIDIA's index), or use "
            "`backend=torch-cuda` / `backend=ort`",
        ) from None
    return trt


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None (for environment reports; never raises)."""
    try:
        return _import_trt().__version__
    except MissingDependencyError:
        return None


class TrtEngine(Engine):
    clock = "cuda-events"

    def __init__(self, model: str | Path, config: EngineConfig) -> None:
        import torch

        from carve.pipeline.graph import load

        trt = _import_trt()
        if not torch.cuda.is_available():
            raise MissingDependencyError("the TensorRT backend needs a CUDA GPU, and torch sees none")
        self.trt, self.torch, self.config = trt, torch, config
        m = load(model)
        self.plan = build_plan(config, trt.__version__, m.proto)
        self.weight_bytes = m.weight_bytes()
        from carve.pipeline.graph.precision import to_fp16

        proto = to_fp16(m) if self.plan.fp16_graph else m.proto
        data = proto.SerializeToString()
        self.gpu = gpu = torch.cuda.get_device_name(0)
        self.timing_cache = "not used (engine from cache)"
        self.key = engine_key(data, trt.__version__, gpu, self.plan)
        cdir = cache_dir(config)
        cdir.mkdir(parents=True, exist_ok=True)
        engine_file = cdir / f"{self.key}.engine"
        self.logger = trt.Logger(trt.Logger.WARNING)
        if engine_file.is_file():
            serialized = engine_file.read_bytes()
            self.cached = True
        else:
            serialized = self._build(data, proto, cdir)
            tmp = engine_file.with_suffix(".tmp")
            tmp.write_bytes(serialized)
            os.replace(tmp, engine_file)
            self.cached = False
        self.engine_bytes = len(serialized)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise CarveError(f"TensorRT could not deserialise the engine for {model}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, torch.Tensor] = {}
        rng = np.random.default_rng(config.seed)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = torch.from_numpy(np.zeros(1, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                shape = [config.batch if d == -1 else d for d in self.engine.get_tensor_shape(name)]
                self.context.set_input_shape(name, shape)
                value = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(dtype)
                self.buffers[name] = value.cuda()
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                shape = list(self.context.get_tensor_shape(name))
                dtype = torch.from_numpy(np.zeros(1, trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
                self.buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.graph = None
        self.graph_fallback: str | None = None
        self._launch()  # one run before any capture (TensorRT's requirement)
        torch.cuda.synchronize()
        if self.plan.cuda_graphs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._launch()
                graph.replay()
                torch.cuda.synchronize()
                self.graph = graph
            except Exception as exc:
                torch.cuda.synchronize()
                self.graph_fallback = (
                    f"CUDA graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                )

    def _build(self, data: bytes, proto, cdir: Path) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if self.plan.strongly_typed_flag else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(data):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise CarveError(f"TensorRT's ONNX parser rejected the model: {errors[:500]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.plan.workspace_bytes)
        config.builder_optimization_level = self.plan.builder_level
        timing_file = timing_cache_path(cdir, trt.__version__, self.gpu)
        self.timing_cache = attach_timing_cache(config, timing_file)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = [self.plan.batch if d == -1 else d for d in t.shape]
            profile.set_shape(t.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CarveError("TensorRT failed to build the engine (see the TensorRT log above)")
        updated = config.get_timing_cache().serialize()
        tmp = timing_file.with_suffix(".tmp")
        tmp.write_bytes(bytes(updated))
        os.replace(tmp, timing_file)
        return bytes(serialized)

    def _launch(self) -> None:
        self.context.execute_async_v3(self.stream.cuda_stream)

    def run(self) -> None:
        with self.torch.cuda.stream(self.stream):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._launch()
        self.stream.synchronize()

    def time(self, n: int) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            for _ in range(n):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._launch()
            end.record(self.stream)
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def times(self, n: int) -> np.ndarray:
        return np.array([self.time(1) for _ in range(n)])

    def outputs(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        for name, value in feeds.items():
            self.buffers[name].copy_(torch.from_numpy(value).to(self.buffers[name].dtype))
        torch.cuda.synchronize()  # the copies ran on the default stream, the engine runs on its own
        self.run()
        outs = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        outs = [n for n in outs if self.engine.get_tensor_mode(n) != self.trt.TensorIOMode.INPUT]
        return [self.buffers[n].float().cpu().numpy() for n in outs]

    def memory(self) -> dict[str, int]:
        return {
            "engine_bytes": self.engine_bytes,
            "weights_bytes": self.weight_bytes,
            "device_memory_bytes": int(self.engine.device_memory_size_v2),
        }

    def info(self) -> dict:
        d = {
            "tensorrt": self.trt.__version__,
            "gpu": self.torch.cuda.get_device_name(0),
            "engine_key": self.key,
            "engine_cached": self.cached,
            "precision": self.plan.precision,
            "fp16_graph": self.plan.fp16_graph,
            "explicit_int8": self.plan.explicit_int8,
            "cuda_graphs": self.graph is not None,
            "builder_level": self.plan.builder_level,
            "workspace_bytes": self.plan.workspace_bytes,
            "timing_cache": self.timing_cache,
        }
        if self.plan.cuda_graphs and self.graph is None:
            d["cuda_graphs_fallback"] = self.graph_fallback or "not captured"
        return d


@backends.register("trt")
class TrtBackend(Backend):
    description = "TensorRT 10/11 on an NVIDIA GPU (strongly typed; FP16 via an FP16 graph)"

    def available(self) -> tuple[bool, str]:
        try:
            _import_trt()
        except MissingDependencyError as exc:
            return False, exc.message
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        return True, ""

    def build(self, model: str | Path, config: EngineConfig) -> Engine:
        return TrtEngine(model, config)
