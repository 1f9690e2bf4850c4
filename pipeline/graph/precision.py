"""Convert a model to FP16 for strongly typed engines, keeping FP32 inputs and outputs.

TensorRT 11 builds only strongly typed networks (the FP16 builder flag is gone): the precision must be in the ONNX
graph. :func:`to_fp16` casts every FP32 initializer to FP16, inserts a Cast after each FP32 graph input and before
each FP32 graph output (the engine's interface stays FP32), turns internal Casts to FP32 into Casts to FP16, and leaves
the inputs that ONNX requires in FP32 alone (Resize/Upsample scales and ROI).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from carve.pipeline.graph import Model

# (op, input index) that must stay FP32 whatever the data type
KEEP_FP32 = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def to_fp16(model: Model) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    keep = {n.input[i] for n in g.node for (op, i) in KEEP_FP32 if n.op_type == op and len(n.input) > i}
    for k, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            arr = numpy_helper.to_array(t).astype(np.float16)
            g.initializer[k].CopyFrom(numpy_helper.from_array(arr, t.name))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    init_names = {t.name for t in g.initializer}
    new_nodes = []
    for inp in g.input:
        if inp.name in init_names or inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        cast = f"{inp.name}__fp16"
        _rename(g.node, inp.name, cast, outputs=False)
        new_nodes.append(
            helper.make_node("Cast", [inp.name], [cast], name=f"{inp.name}__to_fp16", to=TensorProto.FLOAT16)
        )
    tail = []
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = f"{out.name}__fp16"
        _rename(g.node, out.name, inner, outputs=True)
        tail.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}__to_fp32", to=TensorProto.FLOAT))
    nodes = new_nodes + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return proto


def _rename(nodes, old: str, new: str, *, outputs: bool) -> None:
    """Point every use of tensor ``old`` (and its producer, when ``outputs``) at ``new``."""
    for n in nodes:
        fields = (n.input, n.output) if outputs else (n.input,)
        for names in fields:
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new


# ---------------------------------------------------------------------------------------------------------------------
# INT8 (QDQ) facts: what carve needs to know about a quantized graph without running it

QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# integer kernels a runtime may have turned a QDQ model into (ONNX Runtime's optimised graph, contrib ops included)
INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "QLinearReduceMean",
    "QLinearWhere",
    "DynamicQuantizeMatMul",
}
# float ops whose cost dominates a CNN: run in FP32 in a quantized model, they are the fallback that matters
COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
FLOAT_KERNELS = COMPUTE_OPS | {"FusedConv", "FusedGemm", "FusedMatMul"}  # ORT's fused float versions count too


def quantization_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The Q/DQ and integer-kernel nodes of a graph (empty for a float model)."""
    return [n for n in proto.graph.node if n.op_type in QUANT_OPS or n.op_type in INTEGER_OPS]


def refuse_quantized(model: Model, verb: str) -> None:
    """A QDQ model is refused by the passes that rewrite weights (prune, decompose, merge, sparsify): its weights are
    INT8 behind DequantizeLinear, which those passes do not see, and changing them means re-calibrating anyway."""
    from carve.pipeline.errors import CarveError

    q = quantization_nodes(model.proto)
    if q:
        raise CarveError(
            f"{model.source or 'the model'}: is quantized ({q[0].op_type} node {q[0].name!r}); carve can {verb} "
            "FP32 models only",
            hint=f"{verb} the FP32 model first, then `carve quantize` the result",
        )


def is_quantized(model: Model | onnx.ModelProto) -> bool:
    proto = model.proto if isinstance(model, Model) else model
    return bool(quantization_nodes(proto))


def kernel_census(proto: onnx.ModelProto) -> dict[str, object]:
    """What an (optimised) graph runs: integer kernels by op type, float compute ops, and the Q/DQ pairs left.

    ``verdict``: ``integer`` when every compute op became an integer kernel, ``mixed`` when some stayed float,
    ``float`` when none did (a QDQ model run by dequantising to FP32 everywhere)."""
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    integer = {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS}
    float_compute = {k: v for k, v in sorted(ops.items()) if k in FLOAT_KERNELS}
    qdq = {k: v for k, v in sorted(ops.items()) if k in QUANT_OPS}
    if integer and not float_compute:
        verdict = "integer"
    elif integer:
        verdict = "mixed"
    else:
        verdict = "float"
    return {"integer_ops": integer, "float_compute_ops": float_compute, "qdq_ops": qdq, "verdict": verdict}


def asymmetric_qdq(proto: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes whose zero point is not an all-zero INT8 tensor (UINT8 or asymmetric quantization): what
    TensorRT's explicit quantization refuses."""
    inits = {t.name: t for t in proto.graph.initializer}
    bad = []
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            # without a zero point QuantizeLinear produces UINT8 unless told otherwise (opset 21 output_dtype)
            out_type = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
            if n.op_type == "QuantizeLinear" and out_type != onnx.TensorProto.INT8:
                bad.append(n.name)
            continue
        arr = numpy_helper.to_array(zp)
        if arr.dtype != np.int8 or arr.any():
            bad.append(n.name)
    return bad
