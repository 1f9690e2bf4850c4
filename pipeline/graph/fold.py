"""Folding BatchNormalization into the Conv, ConvTranspose or Gemm before it (exact): the graph rewrite behind the
``fold_bn`` pass, also run by ``decompose`` before it factors convolutions.

For y = BN(W x + b) with scale s = gamma / sqrt(var + eps): W' = s * W (per output channel), b' = s (b - mean) + beta.
Applies where the linear node's output feeds only the BN and its weight is a constant no other node reads.
"""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.bn import bn_scale_shift
from carve.pipeline.graph.model import Model, attr
from carve.pipeline.graph.rewrite import finish

LINEAR = ("Conv", "ConvTranspose", "Gemm")


def foldable(model: Model, bn: onnx.NodeProto) -> tuple[onnx.NodeProto | None, str]:
    prod = model.producer.get(bn.input[0])
    if prod is None or prod.op_type not in LINEAR:
        return None, "not after a Conv/ConvTranspose/Gemm"
    if len(model.consumers.get(bn.input[0], [])) != 1 or bn.input[0] in model.output_names:
        return None, f"the output of {prod.name!r} is also read elsewhere"
    w = prod.input[1]
    if not model.is_const(w) or len(model.consumers.get(w, [])) != 1:
        return None, f"the weight of {prod.name!r} is not a private constant"
    if (
        len(prod.input) > 2
        and prod.input[2]
        and (not model.is_const(prod.input[2]) or len(model.consumers.get(prod.input[2], [])) != 1)
    ):
        return None, f"the bias of {prod.name!r} is not a private constant"
    if not all(model.is_const(i) for i in bn.input[1:5]) or len([o for o in bn.output if o]) != 1:
        return None, "its parameters are not constants or it runs in training mode"
    if prod.op_type == "Gemm" and (
        attr(prod, "transA", 0) or model.shape(bn.input[0]) is None or len(model.shape(bn.input[0])) != 2
    ):
        return None, "the Gemm is transposed on its input"
    return prod, ""


def fold(model: Model, prod: onnx.NodeProto, bn: onnx.NodeProto) -> None:
    scale, shift = bn_scale_shift(model, bn)
    w = model.array(prod.input[1]).astype(np.float64)
    if prod.op_type == "Conv":
        axis = 0
    elif prod.op_type == "ConvTranspose":
        axis = 1  # W is [Cin, Cout/g, ...]
        if int(attr(prod, "group", 1)) != 1:
            raise ValueError("grouped ConvTranspose")
    else:
        axis = 0 if attr(prod, "transB", 0) else 1
        alpha = float(attr(prod, "alpha", 1.0))
        w = w * alpha
    shape = [1] * w.ndim
    shape[axis] = -1
    cout = w.shape[axis]
    b = np.zeros(cout)
    if len(prod.input) > 2 and prod.input[2]:
        braw = model.array(prod.input[2]).astype(np.float64)
        if prod.op_type == "Gemm":
            braw = braw * float(attr(prod, "beta", 1.0))
        b = np.broadcast_to(braw.reshape(-1), (cout,)).copy() if braw.size in (1, cout) else None
        if b is None:
            raise ValueError("bias is not per output channel")
    dtype = model.array(prod.input[1]).dtype
    model.set_array(prod.input[1], (w * scale.reshape(shape)).astype(dtype))
    new_b = (b * scale + shift).astype(dtype)
    if len(prod.input) > 2 and prod.input[2]:
        name = prod.input[2]
        model.graph.initializer.remove(model.init[name])
        del model.init[name]
        prod.input[2] = model.add_initializer(name, new_b)
    else:
        while len(prod.input) < 3:
            prod.input.append("")
        prod.input[2] = model.add_initializer(f"{prod.name}_bias", new_b)
    if prod.op_type == "Gemm":
        for k in ("alpha", "beta"):
            for a in list(prod.attribute):
                if a.name == k:
                    prod.attribute.remove(a)
    prod.output[0] = bn.output[0]
    model.graph.node.remove(bn)


def fold_batchnorms(model: Model) -> tuple[Model, int, list[str]]:
    """A copy of ``model`` with every foldable BatchNormalization folded; how many were, and one line per BN."""
    out = model.copy()
    details, n = [], 0
    for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization"]:
        prod, why = foldable(out, bn)
        if prod is None:
            details.append(f"{bn.name}: kept ({why})")
            continue
        try:
            fold(out, prod, bn)
        except ValueError as exc:
            details.append(f"{bn.name}: kept ({exc})")
            continue
        out.refresh(shapes=False)
        n += 1
        details.append(f"{bn.name}: folded into {prod.name}")
    if n:
        finish(out)
    return out, n, details
