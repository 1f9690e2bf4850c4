"""Static INT8 quantization through ONNX Runtime's own quantizer (``onnxruntime.quantization.quantize_static``).

carve writes no quantizer of its own: it prepares the model (``quant_pre_process``: ONNX Runtime's shape inference
and basic graph optimisation, which folds an unfused BatchNorm into its conv so the conv is quantized with the
folded weight), feeds the calibration batches through a ``CalibrationDataReader``, and asks for the QDQ format with

* weights: per-channel, symmetric INT8 (``WeightSymmetric``; ``reduce_range`` 7-bit weights for CPUs without VNNI);
* activations: per-tensor, UINT8 asymmetric (ONNX Runtime's and OpenVINO's CPU recommendation) or INT8 symmetric
  (what TensorRT's explicit quantization requires; biases then stay FP32, as TensorRT takes no INT32 bias Q/DQ);
* calibration: ``minmax``, ``entropy`` or ``percentile`` (ONNX Runtime's calibrators).

Calibration runs once: ONNX Runtime's calibration cache (``calibration_cache_path``) keeps the tensor ranges, so
quantizing the same model again with other nodes kept in FP32 (the sensitivity search of
:mod:`carve.pipeline.measure.quantization`) reuses them instead of re-running the data.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from carve.pipeline.errors import CarveError, first_line
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.precision import COMPUTE_OPS, is_quantized

METHODS = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("uint8", "int8")


@dataclass(frozen=True)
class QuantSettings:
    method: str = "minmax"
    activations: str = "uint8"  # uint8 asymmetric (CPU engines) | int8 symmetric (TensorRT)
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: for CPUs without VNNI (saturation of u8s8 products)

    def check(self) -> None:
        if self.method not in METHODS:
            raise CarveError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise CarveError(f"`activations` must be uint8 or int8, got {self.activations!r}")

    def describe(self) -> dict:
        return {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "calibration": self.method,
            "weights": "int8 per-channel symmetric" if self.per_channel else "int8 per-tensor symmetric",
            "activations": f"{self.activations} per-tensor "
            + ("asymmetric" if self.activations == "uint8" else "symmetric"),
            "reduce_range": self.reduce_range,
        }


def supported_ops() -> set[str]:
    """Op types ONNX Runtime's QDQ quantizer handles."""
    from onnxruntime.quantization.registry import QDQRegistry

    return set(QDQRegistry)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds, self.k = feeds, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.k >= len(self.feeds):
            return None
        self.k += 1
        return self.feeds[self.k - 1]

    def __len__(self) -> int:
        return len(self.feeds)


@contextlib.contextmanager
def _quiet_ort_logging():
    """ONNX Runtime's quantizer logs advice at WARNING through the root logger and its calibrators print progress to
    stdout (which would corrupt ``--json``); carve reports what it did itself."""
    import io

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Quantizer:
    """One model prepared for quantization, its calibration ranges computed once; :meth:`quantize` makes a QDQ model
    with any set of nodes kept in FP32. Use as a context manager (it owns a temporary folder)."""

    def __init__(
        self, model: Model, feeds: list[dict[str, np.ndarray]], settings: QuantSettings, *, where: str = ""
    ) -> None:
        settings.check()
        self.where = where or str(model.source or "model")
        if is_quantized(model):
            raise CarveError(
                f"{self.where}: is already quantized (it holds QuantizeLinear/DequantizeLinear nodes)",
                hint="quantize the FP32 model (prune first, then quantize)",
            )
        if not feeds:
            raise CarveError(f"{self.where}: no calibration data", hint="give `calib` FILE.npz | FOLDER | digits")
        for inp in model.proto.graph.input:
            if inp.name in model.init:
                continue
            et = inp.type.tensor_type.elem_type
            if et != onnx.TensorProto.FLOAT and inp.name in feeds[0]:
                raise CarveError(
                    f"{self.where}: input {inp.name!r} is {onnx.TensorProto.DataType.Name(et)}; ONNX Runtime's "
                    "static quantizer calibrates FP32 models",
                    hint="quantize the FP32 export (carve's FP16 conversion happens at engine build time)",
                )
        self.settings = settings
        self.feeds = feeds
        self.tmp = tempfile.TemporaryDirectory(prefix="carve-quant-")
        self.dir = Path(self.tmp.name)
        self.cache = self.dir / "calibration.json"
        self.prepared = self.dir / "prepared.onnx"
        self._prepare(model)
        self.model = onnx.load(str(self.prepared))
        self.calibrated = False

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.tmp.cleanup()

    def _prepare(self, model: Model) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = self.dir / "input.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model.proto)  # save_model with external data rewrites the proto it is given
        onnx.save_model(copy, str(src), save_as_external_data=True, location="input.onnx.data")
        try:
            with _quiet_ort_logging():
                quant_pre_process(
                    str(src),
                    str(self.prepared),
                    skip_symbolic_shape=True,  # symbolic inference refuses some exports; onnx's inference suffices
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    external_data_location="prepared.onnx.data",
                )
        except Exception as exc:
            raise CarveError(
                f"{self.where}: ONNX Runtime's quantization pre-processing failed ({first_line(exc)})",
                hint="check that the model runs in ONNX Runtime as it is",
            ) from None

    def candidates(self) -> list[onnx.NodeProto]:
        """The compute nodes (Conv, ConvTranspose, Gemm, MatMul) with a constant weight that INT8 turns into integer
        kernels: the nodes per-node sensitivity ranks and ``keep_fp32`` may keep in FP32."""
        inits = {t.name for t in self.model.graph.initializer}
        return [
            n
            for n in self.model.graph.node
            if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in inits and n.name
        ]

    def check_nodes(self, patterns: Iterable[str], what: str) -> list[str]:
        """The prepared graph's nodes ``patterns`` name (pattern -> error when one names nothing or an op the
        quantizer cannot quantize)."""
        names = [n.name for n in self.model.graph.node]
        ops = {n.name: n.op_type for n in self.model.graph.node}
        out: list[str] = []
        supported = supported_ops()
        for p in patterns:
            hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
            if not hit:
                raise CarveError(
                    f"{self.where}: `{what}` {p!r} names no node of the model (after ONNX Runtime's pre-processing)",
                    hint="`carve inspect MODEL --nodes` lists the node names",
                )
            for n in hit:
                if what == "include" and ops[n] not in supported:
                    raise CarveError(
                        f"{self.where}: node {n!r} ({ops[n]}) cannot be quantized: ONNX Runtime's QDQ quantizer "
                        f"has no {ops[n]} support",
                        hint=f"leave {n!r} out of `include`",
                    )
            out += [n for n in hit if n not in out]
        return out

    def quantize(self, exclude: Iterable[str] = (), include: Iterable[str] | None = None) -> onnx.ModelProto:
        """A QDQ model of the prepared graph with ``exclude`` kept in FP32 (``include``: quantize only these)."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        s = self.settings
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[s.method]
        act = QuantType.QUInt8 if s.activations == "uint8" else QuantType.QInt8
        out = self.dir / "quantized.onnx"
        extra = {"WeightSymmetric": True, "ActivationSymmetric": s.activations == "int8"}
        if s.activations == "int8":  # for TensorRT: it takes INT8 Q/DQ only, so biases stay float (no INT32 bias)
            extra["QuantizeBias"] = False
        try:
            with _quiet_ort_logging():
                quantize_static(
                    str(self.prepared),
                    str(out),
                    None if self.calibrated else _Reader(self.feeds),
                    quant_format=QuantFormat.QDQ,
                    per_channel=s.per_channel,
                    reduce_range=s.reduce_range,
                    activation_type=act,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=list(include) if include else None,
                    nodes_to_exclude=list(exclude),
                    calibrate_method=method,
                    calibration_cache_path=str(self.cache),
                    use_external_data_format=True,
                    extra_options=extra,
                )
        except CarveError:
            raise
        except Exception as exc:
            raise CarveError(
                f"{self.where}: ONNX Runtime's quantizer failed ({type(exc).__name__}: {first_line(exc)})",
                hint="keep the node it names in FP32 (`keep_fp32`), or check that the calibration data fits the model",
            ) from None
        self.calibrated = True
        proto = onnx.load(str(out))
        for f in self.dir.glob("quantized.onnx*"):
            f.unlink()
        return proto


def ort_kernels(model: onnx.ModelProto | str | Path, *, threads: int = 1) -> dict[str, object]:
    """What ONNX Runtime's CPU provider really runs for a (QDQ) model: the optimised graph it writes out, counted by
    :func:`carve.pipeline.graph.precision.kernel_census` (integer kernels such as QLinearConv / ConvInteger / QGemm,
    float compute ops left, Q/DQ left)."""
    import onnxruntime as ort

    from carve.pipeline.graph.precision import kernel_census

    with tempfile.TemporaryDirectory(prefix="carve-ortopt-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        census = kernel_census(onnx.load(so.optimized_model_filepath, load_external_data=False))
    census["engine"] = f"onnxruntime {ort.__version__} CPUExecutionProvider (ORT_ENABLE_ALL)"
    return census
