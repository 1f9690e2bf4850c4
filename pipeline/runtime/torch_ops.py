"""The ONNX ops the PyTorch runner (:mod:`carve.pipeline.runtime.torch_graph`) knows, as *kernel builders*.

A builder is called once per node when a program is recorded for given input shapes. It sees every input as an
:class:`In`: its shape and dtype, and its value when that value is known on the host at build time (integer and
argument initializers, ``Shape`` outputs, anything computed from those). It resolves everything that shapes the
computation — pads and pad values, resize sizes, reshape targets, slice bounds, split sizes, ranges — into Python values
and returns a :class:`Kernel`: a function of tensors only, with those values bound. The recorded program calls the
kernels and nothing else, so a run reads nothing back from the device and copies nothing to it: it can be captured in
a CUDA graph or traced by ``torch.compile(fullgraph=True)``.

An argument that only the input *data* decides (a reshape target computed from activations, say) cannot be resolved
when the graph is built: :meth:`In.array` raises :class:`DataDependent` in a static build, and in a dynamic run reads
the value back from the device (the one place a host read remains, and that run is then never replayed).

``OPS`` maps op type to builder; ``ARGS`` lists the input positions a builder reads as host arguments (an initializer
used only there is a constant, not a parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.conv import resolve_pads

OPS: dict[str, Callable] = {}
ARGS: dict[str, tuple[int, ...]] = {}


def op(*names: str, args: tuple[int, ...] = ()):
    """Register a builder ``(graph, node, ins) -> Kernel | callable | Folded`` for the ONNX op types ``names``."""

    def deco(fn):
        for n in names:
            OPS[n] = fn
            ARGS[n] = args
        return fn

    return deco


DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.INT16: torch.int16,
}


class DataDependent(CarveError):
    """A value that shapes the computation is only known when the input data is (a truly dynamic shape)."""


class Node:
    """What a builder needs of an ONNX node: name, op type, input/output names, decoded attributes."""

    __slots__ = ("name", "op", "inputs", "outputs", "attrs")

    def __init__(self, n: onnx.NodeProto) -> None:
        self.name, self.op = n.name, n.op_type
        self.inputs, self.outputs = list(n.input), list(n.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for k, v in list(self.attrs.items()):
            if isinstance(v, bytes):
                self.attrs[k] = v.decode()
            elif isinstance(v, onnx.TensorProto):
                self.attrs[k] = numpy_helper.to_array(v)

    def a(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


class In:
    """One input of a node while a program is recorded: a host value known at build time, a device tensor, or absent
    (an optional input left empty)."""

    __slots__ = ("node", "name", "host", "tensor", "reader")

    def __init__(self, node: Node, name: str, host: np.ndarray | None, tensor: torch.Tensor | None, reader) -> None:
        self.node, self.name, self.host, self.tensor, self.reader = node, name, host, tensor, reader

    @property
    def present(self) -> bool:
        return self.host is not None or self.tensor is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.host.shape) if self.host is not None else tuple(self.tensor.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        if self.host is not None:
            return torch.from_numpy(np.empty(0, self.host.dtype)).dtype
        return self.tensor.dtype

    def array(self, what: str) -> np.ndarray | None:
        """The value as a host array (None when absent). A device value is data-dependent (see the module doc)."""
        if self.host is not None:
            return self.host
        if self.tensor is None:
            return None
        return self.reader(self, what)

    def ints(self, what: str) -> list[int] | None:
        v = self.array(what)
        return None if v is None else [int(x) for x in np.ravel(v)]

    def floats(self, what: str) -> list[float] | None:
        v = self.array(what)
        return None if v is None else [float(x) for x in np.ravel(v)]


class Kernel:
    """A function of tensors only, and which node inputs it takes (indices; a :class:`Const` is a host array the
    recorder turns into a device tensor once)."""

    __slots__ = ("fn", "operands")

    def __init__(self, fn: Callable, operands: Sequence[int | Const]) -> None:
        self.fn, self.operands = fn, tuple(operands)


class Const:
    __slots__ = ("value",)

    def __init__(self, value: np.ndarray) -> None:
        self.value = np.asarray(value)


class Folded:
    """Outputs known at build time (host arrays): shapes, sizes, constants."""

    __slots__ = ("values",)

    def __init__(self, *values: np.ndarray) -> None:
        self.values = [np.asarray(v) for v in values]


def kernel(fn: Callable, *operands: int | Const) -> Kernel:
    return Kernel(fn, operands)


def ints(v: Any) -> list[int]:
    """An attribute value (list, array) as Python ints."""
    return [] if v is None else [int(x) for x in np.ravel(v)]


def _spatial_pads(n: Node, x: In, kernel_: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved from the input's (known) spatial shape."""
    return resolve_pads(n.a("auto_pad", "NOTSET"), n.a("pads"), list(x.shape[2:]), kernel_, strides, dil)


def _split_pads(pads: list[int]) -> tuple[list[int], list[int]]:
    """(F.pad's pads for the asymmetric part or [], the symmetric pads left for the op)."""
    nd = len(pads) // 2
    b, e = pads[:nd], pads[nd:]
    if b == e:
        return [], b
    torch_pads: list[int] = []
    for k in reversed(range(nd)):
        torch_pads += [b[k], e[k]]
    return torch_pads, [0] * nd


# ----------------------------------------------------------------------------------------------------------------------
# convolution, normalisation, linear


def _conv_geometry(n: Node, ins: list[In]):
    w = ins[1]
    nd = w.ndim - 2
    return nd, list(w.shape[2:]), ints(n.a("strides", [1] * nd)), ints(n.a("dilations", [1] * nd))


@op("Conv")
def _conv(g, n: Node, ins: list[In]):
    nd, k, strides, dil = _conv_geometry(n, ins)
    asym, pads = _split_pads(_spatial_pads(n, ins[0], k, strides, dil))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    group = int(n.a("group", 1))
    if asym:
        return kernel(lambda x, w, b: fn(F.pad(x, asym), w, b, strides, pads, dil, group), 0, 1, 2)
    return kernel(lambda x, w, b: fn(x, w, b, strides, pads, dil, group), 0, 1, 2)


@op("ConvTranspose")
def _conv_t(g, n: Node, ins: list[In]):
    nd, _, strides, dil = _conv_geometry(n, ins)
    pads = ints(n.a("pads", [0] * (2 * nd)))
    out_pad = ints(n.a("output_padding", [0] * nd))
    if n.a("output_shape") is not None or n.a("auto_pad", "NOTSET") != "NOTSET" or pads[:nd] != pads[nd:]:
        raise CarveError(
            f"ConvTranspose {n.name!r}: output_shape/auto_pad/asymmetric pads are not supported by the PyTorch runner"
        )
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    group = int(n.a("group", 1))
    return kernel(lambda x, w, b: fn(x, w, b, strides, pads[:nd], out_pad, group, dil), 0, 1, 2)


@op("BatchNormalization")
def _bn(g, n: Node, ins: list[In]):
    eps = float(n.a("epsilon", 1e-5))
    momentum = 1.0 - float(n.a("momentum", 0.9))  # ONNX weighs the running value, torch the batch's

    def bn(x, scale, bias, mean, var):
        # graph.batch_statistics is read at run time: a fine-tuning loop switches it without rebuilding programs
        return F.batch_norm(x, mean, var, scale, bias, g.batch_statistics, momentum, eps)

    return kernel(bn, 0, 1, 2, 3, 4)


@op("InstanceNormalization")
def _in(g, n: Node, ins: list[In]):
    eps = float(n.a("epsilon", 1e-5))
    return kernel(lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=eps), 0, 1, 2)


@op("LayerNormalization")
def _layer_norm(g, n: Node, ins: list[In]):
    if any(o for o in n.outputs[1:]):
        raise CarveError(f"LayerNormalization {n.name!r}: its Mean/InvStdDev outputs are not supported")
    eps = float(n.a("epsilon", 1e-5))
    first = int(n.a("axis", -1)) % ins[0].ndim
    has_bias = len(ins) > 2 and ins[2].present

    def layer_norm(x, w, b):
        y = F.layer_norm(x, x.shape[first:], None, None, eps) * w  # scale and bias broadcast, as ONNX allows
        return y + b if has_bias else y

    return kernel(layer_norm, 0, 1, 2)


@op("LRN")
def _lrn(g, n: Node, ins: list[In]):
    size, alpha, beta, bias = (
        int(n.a("size")),
        float(n.a("alpha", 1e-4)),
        float(n.a("beta", 0.75)),
        float(n.a("bias", 1)),
    )
    return kernel(lambda x: F.local_response_norm(x, size, alpha, beta, bias), 0)


@op("Gemm")
def _gemm(g, n: Node, ins: list[In]):
    ta, tb = bool(n.a("transA", 0)), bool(n.a("transB", 0))
    alpha, beta = float(n.a("alpha", 1.0)), float(n.a("beta", 1.0))
    has_c = len(ins) > 2 and ins[2].present
    if tb and not ta and alpha == 1.0 and beta == 1.0 and (not has_c or ins[2].ndim == 1):
        return kernel(F.linear, 0, 1, 2)  # the classifier head: one fused kernel, as nn.Linear runs it

    def gemm(a, b, c):
        y = (a.t() if ta else a) @ (b.t() if tb else b)
        if alpha != 1.0:
            y = alpha * y
        if has_c:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    return kernel(gemm, 0, 1, 2)


@op("MatMul")
def _matmul(g, n, ins):
    return kernel(torch.matmul, 0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# element-wise

_UNARY = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softplus": F.softplus,
    "HardSwish": F.hardswish,
    "Identity": lambda x: x,
}


@op(*_UNARY)
def _unary(g, n: Node, ins):
    return kernel(_UNARY[n.op], 0)


@op("Dropout")
def _dropout(g, n: Node, ins):
    return kernel(lambda x: (x, torch.ones_like(x, dtype=torch.bool)), 0)


@op("LeakyRelu")
def _leaky(g, n: Node, ins):
    alpha = float(n.a("alpha", 0.01))
    return kernel(lambda x: F.leaky_relu(x, alpha), 0)


@op("Elu", "Celu")
def _elu(g, n: Node, ins):
    alpha, fn = float(n.a("alpha", 1.0)), F.elu if n.op == "Elu" else F.celu
    return kernel(lambda x: fn(x, alpha), 0)


@op("Selu")
def _selu(g, n: Node, ins):
    alpha, gamma = float(n.a("alpha", 1.6732632423543772)), float(n.a("gamma", 1.0507009873554805))
    return kernel(lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)), 0)


@op("ThresholdedRelu")
def _trelu(g, n: Node, ins):
    alpha = float(n.a("alpha", 1.0))
    return kernel(lambda x: torch.where(x > alpha, x, torch.zeros_like(x)), 0)


@op("Gelu")
def _gelu(g, n: Node, ins):
    approximate = n.a("approximate", "none")
    return kernel(lambda x: F.gelu(x, approximate=approximate), 0)


@op("HardSigmoid")
def _hsig(g, n: Node, ins):
    alpha, beta = float(n.a("alpha", 0.2)), float(n.a("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:  # torch's own hardsigmoid, as the exporter writes it: one kernel
        return kernel(F.hardsigmoid, 0)
    return kernel(lambda x: torch.clamp(alpha * x + beta, 0, 1), 0)


@op("PRelu")
def _prelu(g, n, ins):
    return kernel(lambda x, slope: torch.where(x >= 0, x, slope * x), 0, 1)


@op("Clip", args=(1, 2))
def _clip(g, n: Node, ins: list[In]):
    bounds = [ins[i] if len(ins) > i and ins[i].present else None for i in (1, 2)]
    if all(b is None or b.host is not None for b in bounds):  # known bounds: Python numbers, one fused kernel
        lo = bounds[0].floats("min")[0] if bounds[0] is not None else n.a("min")
        hi = bounds[1].floats("max")[0] if bounds[1] is not None else n.a("max")
        if not ins[0].dtype.is_floating_point:
            lo, hi = (None if v is None else int(v) for v in (lo, hi))
        return kernel(lambda x: torch.clamp(x, lo, hi), 0)
    # bounds computed on the device: tensor bounds, still no host read
    return kernel(lambda x, lo, hi: torch.clamp(x, lo, hi), 0, 1, 2)


def _int_div(a, b):
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "Less": torch.lt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
    "Mod": torch.fmod,
    "Div": torch.div,
}


@op(*_BINARY)
def _binary(g, n: Node, ins: list[In]):
    if n.op == "Div" and not ins[0].dtype.is_floating_point and not ins[1].dtype.is_floating_point:
        return kernel(_int_div, 0, 1)
    return kernel(_BINARY[n.op], 0, 1)


_NARY = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}


@op(*_NARY)
def _nary(g, n: Node, ins: list[In]):
    fn, k, mean = _NARY[n.op], len(ins), n.op == "Mean"

    def nary(*xs):
        out = xs[0]
        for v in xs[1:]:
            out = fn(out, v)
        return out / k if mean else out

    return kernel(nary, *range(k))


@op("Where")
def _where(g, n, ins):
    return kernel(torch.where, 0, 1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# pooling, resizing, padding


def _pool_geometry(n: Node, x: In):
    k = ints(n.a("kernel_shape"))
    nd = len(k)
    strides, dil = ints(n.a("strides", [1] * nd)), ints(n.a("dilations", [1] * nd))
    return k, strides, dil, _spatial_pads(n, x, k, strides, dil)


@op("MaxPool")
def _maxpool(g, n: Node, ins: list[In]):
    k, strides, dil, pads = _pool_geometry(n, ins[0])
    asym, p = _split_pads(pads)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(k)]
    ceil = bool(n.a("ceil_mode", 0))
    if asym:
        return kernel(lambda x: fn(F.pad(x, asym, value=float("-inf")), k, strides, p, dil, ceil_mode=ceil), 0)
    return kernel(lambda x: fn(x, k, strides, p, dil, ceil_mode=ceil), 0)


@op("AveragePool")
def _avgpool(g, n: Node, ins: list[In]):
    k, strides, _, pads = _pool_geometry(n, ins[0])
    include = bool(n.a("count_include_pad", 0))
    nd = len(k)
    if pads[:nd] != pads[nd:] and not include:
        raise CarveError(f"AveragePool {n.name!r}: asymmetric pads without count_include_pad are not supported")
    asym, p = _split_pads(pads)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    ceil = bool(n.a("ceil_mode", 0))
    if asym:
        return kernel(lambda x: fn(F.pad(x, asym), k, strides, p, ceil_mode=ceil, count_include_pad=include), 0)
    return kernel(lambda x: fn(x, k, strides, p, ceil_mode=ceil, count_include_pad=include), 0)


@op("GlobalAveragePool")
def _gap(g, n, ins: list[In]):
    if ins[0].ndim == 4:  # the pooling kernel (it has a channels_last path), as nn.AdaptiveAvgPool2d runs it
        return kernel(lambda x: F.adaptive_avg_pool2d(x, 1), 0)
    dims = tuple(range(2, ins[0].ndim))
    return kernel(lambda x: x.mean(dim=dims, keepdim=True), 0)


@op("GlobalMaxPool")
def _gmp(g, n, ins: list[In]):
    dims = tuple(range(2, ins[0].ndim))
    return kernel(lambda x: x.amax(dim=dims, keepdim=True), 0)


@op("Resize", "Upsample", args=(1, 2, 3))
def _resize(g, n: Node, ins: list[In]):
    x = ins[0]
    if n.op == "Upsample":
        scales, sizes = ins[1].floats("scales"), None
    else:
        scales = ins[2].floats("scales") if len(ins) > 2 and ins[2].present else None
        sizes = ins[3].ints("sizes") if len(ins) > 3 and ins[3].present else None
        scales = scales or None  # an empty scales tensor means "use sizes"
    mode = n.a("mode", "nearest")
    ctm = n.a("coordinate_transformation_mode", "half_pixel" if n.op == "Resize" else "asymmetric")
    if sizes is None:
        if scales is None:
            raise CarveError(f"Resize {n.name!r} has neither scales nor sizes")
        if scales[:2] != [1.0, 1.0]:
            raise CarveError(f"Resize {n.name!r} scales the batch or channel axis")
        out = [int(math.floor(s * f)) for s, f in zip(x.shape[2:], scales[2:])]
    else:
        out = sizes[2:]
    if mode == "nearest":
        nearest = n.a("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nearest == "floor":
            return kernel(lambda x: F.interpolate(x, size=out, mode="nearest"), 0)
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            return kernel(lambda x: F.interpolate(x, size=out, mode="nearest-exact"), 0)
        raise CarveError(f"Resize {n.name!r}: nearest with {ctm}/{nearest} is not supported by the PyTorch runner")
    if mode == "linear":
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
        if ctm == "align_corners":
            return kernel(lambda x: F.interpolate(x, size=out, mode=torch_mode, align_corners=True), 0)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return kernel(lambda x: F.interpolate(x, size=out, mode=torch_mode, align_corners=False), 0)
    raise CarveError(f"Resize {n.name!r}: mode {mode} with {ctm} is not supported by the PyTorch runner")


@op("Pad", args=(1, 2, 3))
def _pad(g, n: Node, ins: list[In]):
    rank = ins[0].ndim
    pads = ins[1].ints("pads") if len(ins) > 1 and ins[1].present else ints(n.a("pads"))
    value = ins[2].floats("constant value")[0] if len(ins) > 2 and ins[2].present else float(n.a("value", 0.0))
    axes = ins[3].ints("axes") if len(ins) > 3 and ins[3].present else list(range(rank))
    axes = [a % rank for a in axes]
    k = len(axes)
    full_b, full_e = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        full_b[a], full_e[a] = pads[i], pads[i + k]
    torch_pads: list[int] = []
    for a in reversed(range(rank)):
        torch_pads += [full_b[a], full_e[a]]
    mode = n.a("mode", "constant")
    if mode == "constant":
        if not ins[0].dtype.is_floating_point:
            value = int(value)
        return kernel(lambda x: F.pad(x, torch_pads, value=value), 0)
    lead = 2 * (rank - 2)  # reflect/replicate pad only spatial dims in torch
    if any(torch_pads[lead:]):
        raise CarveError(f"Pad {n.name!r}: {mode} padding of the batch or channel axis is not supported")
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    spatial = torch_pads[:lead]
    return kernel(lambda x: F.pad(x, spatial, mode=torch_mode), 0)


# ----------------------------------------------------------------------------------------------------------------------
# shapes and indexing


@op("Concat")
def _concat(g, n: Node, ins: list[In]):
    axis = int(n.a("axis"))
    present = [i for i, v in enumerate(ins) if v.present]
    return kernel(lambda *xs: torch.cat(xs, dim=axis), *present)


@op("Split", args=(1,))
def _split(g, n: Node, ins: list[In]):
    x = ins[0]
    axis = int(n.a("axis", 0)) % x.ndim
    if len(ins) > 1 and ins[1].present:
        sizes = ins[1].ints("split sizes")
    elif n.a("split") is not None:
        sizes = ints(n.a("split"))
    else:
        k = int(n.a("num_outputs", len(n.outputs)))
        step = -(-x.shape[axis] // k)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(k)]
    return kernel(lambda x: torch.split(x, sizes, dim=axis), 0)


@op("Slice", args=(1, 2, 3, 4))
def _slice(g, n: Node, ins: list[In]):
    shape = ins[0].shape
    starts, ends = ins[1].ints("starts"), ins[2].ints("ends")
    axes = ins[3].ints("axes") if len(ins) > 3 and ins[3].present else list(range(len(starts)))
    steps = ins[4].ints("steps") if len(ins) > 4 and ins[4].present else [1] * len(starts)
    index: list[slice] = [slice(None)] * len(shape)
    flips: list[int] = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= len(shape)
        if st < 0:
            # a negative step is a flip then a positive-step slice: the positions are known now, no index tensor
            picked = list(range(shape[a]))[slice(s, e, st)]
            flips.append(a)
            index[a] = slice(shape[a] - 1 - picked[0], shape[a] - picked[-1], -st) if picked else slice(0, 0)
        else:
            index[a] = slice(s, e, st)
    idx = tuple(index)
    if flips:
        return kernel(lambda x: x.flip(flips)[idx], 0)
    return kernel(lambda x: x[idx], 0)


@op("Gather")
def _gather(g, n: Node, ins: list[In]):
    x, indices = ins
    axis = int(n.a("axis", 0)) % x.ndim
    size = x.shape[axis]
    lead, tail = x.shape[:axis], x.shape[axis + 1 :]
    out_shape = (*lead, *indices.shape, *tail)
    if indices.host is not None:  # known indices: normalised now, one device tensor made once
        idx = np.asarray(indices.host, np.int64)
        idx = np.where(idx < 0, idx + size, idx).reshape(-1)
        return kernel(lambda x, i: x.index_select(axis, i).reshape(out_shape), 0, Const(idx))

    def gather(x, i):
        i = i.long()
        i = torch.where(i < 0, i + size, i)
        return x.index_select(axis, i.reshape(-1)).reshape(out_shape)

    return kernel(gather, 0, 1)


@op("Flatten")
def _flatten(g, n: Node, ins: list[In]):
    shape = ins[0].shape
    axis = int(n.a("axis", 1)) % (len(shape) + 1) if shape else 0
    lead = int(np.prod(shape[:axis], dtype=np.int64))
    return kernel(lambda x: x.reshape(lead, -1), 0)


@op("Reshape", args=(1,))
def _reshape(g, n: Node, ins: list[In]):
    shape = ins[1].ints("target shape")
    if not n.a("allowzero", 0):
        shape = [ins[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return kernel(lambda x: x.reshape(shape), 0)


@op("Transpose")
def _transpose(g, n: Node, ins: list[In]):
    perm = n.a("perm")
    perm = ints(perm) if perm is not None else list(reversed(range(ins[0].ndim)))
    return kernel(lambda x: x.permute(*perm), 0)


@op("Squeeze", args=(1,))
def _squeeze(g, n: Node, ins: list[In]):
    rank = ins[0].ndim
    axes = ins[1].ints("axes") if len(ins) > 1 and ins[1].present else n.a("axes")
    if axes is None:
        dims = tuple(i for i, d in enumerate(ins[0].shape) if d == 1)
    else:
        dims = tuple(sorted(a % rank for a in ints(axes)))
    return kernel(lambda x: x.squeeze(dims) if dims else x, 0)


@op("Unsqueeze", args=(1,))
def _unsqueeze(g, n: Node, ins: list[In]):
    axes = ins[1].ints("axes") if len(ins) > 1 and ins[1].present else ints(n.a("axes"))
    rank = ins[0].ndim + len(axes)
    dims = sorted(a % rank for a in axes)

    def unsqueeze(x):
        for a in dims:
            x = x.unsqueeze(a)
        return x

    return kernel(unsqueeze, 0)


def _reduce_axes(n: Node, ins: list[In], rank: int) -> list[int] | None:
    if len(ins) > 1 and ins[1].present:
        axes = ins[1].ints("axes")
    else:
        axes = n.a("axes")
        axes = ints(axes) if axes is not None else None
    if not axes:
        return None if not n.a("noop_with_empty_axes", 0) else []
    return [a % rank for a in axes]


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL2": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt(),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


@op(*_REDUCE, args=(1,))
def _reduce(g, n: Node, ins: list[In]):
    rank = ins[0].ndim
    axes = _reduce_axes(n, ins, rank)
    if axes == []:
        return kernel(lambda x: x, 0)
    dims, keep, fn = tuple(range(rank)) if axes is None else tuple(axes), bool(n.a("keepdims", 1)), _REDUCE[n.op]
    return kernel(lambda x: fn(x, dims, keep), 0)


@op("ArgMax", "ArgMin")
def _arg(g, n: Node, ins):
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    axis, keep = int(n.a("axis", 0)), bool(n.a("keepdims", 1))
    return kernel(lambda x: fn(x, dim=axis, keepdim=keep), 0)


@op("Softmax", "LogSoftmax")
def _softmax(g, n: Node, ins: list[In]):
    fn = F.softmax if n.op == "Softmax" else F.log_softmax
    if g.opset >= 13:
        axis = int(n.a("axis", -1))
        return kernel(lambda x: fn(x, dim=axis), 0)
    shape = ins[0].shape
    axis = int(n.a("axis", 1)) % len(shape)  # opset < 13: coerced to 2-D at axis
    lead = int(np.prod(shape[:axis], dtype=np.int64))
    return kernel(lambda x: fn(x.reshape(lead, -1), dim=1).reshape(shape), 0)


@op("Cast")
def _cast(g, n: Node, ins):
    dtype = g.cast_dtype(DTYPES[int(n.a("to"))])
    return kernel(lambda x: x.to(dtype), 0)


@op("CastLike")
def _castlike(g, n, ins: list[In]):
    dtype = ins[1].dtype
    return kernel(lambda x: x.to(dtype), 0)


@op("Shape")
def _shape(g, n: Node, ins: list[In]):
    dims = list(ins[0].shape)
    start, end = int(n.a("start", 0)), n.a("end")
    return Folded(np.array(dims[start:end], dtype=np.int64))


@op("Size")
def _size(g, n, ins: list[In]):
    return Folded(np.array(int(np.prod(ins[0].shape, dtype=np.int64)), dtype=np.int64))


@op("ConstantOfShape", args=(0,))
def _const_of_shape(g, n: Node, ins: list[In]):
    value = n.a("value")
    v = np.array(value).reshape(-1)[:1] if value is not None else np.zeros(1, np.float32)
    return Folded(np.full(ins[0].ints("shape"), v[0], dtype=v.dtype))


@op("Constant")
def _constant(g, n: Node, ins):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if n.a(key) is not None:
            return Folded(np.array(n.a(key)))
    raise CarveError(f"Constant {n.name!r}: unsupported value kind")


@op("Expand", args=(1,))
def _expand(g, n: Node, ins: list[In]):
    target = tuple(torch.broadcast_shapes(ins[0].shape, tuple(ins[1].ints("target shape"))))
    return kernel(lambda x: x.expand(target), 0)


@op("Tile", args=(1,))
def _tile(g, n, ins: list[In]):
    reps = ins[1].ints("repeats")
    return kernel(lambda x: x.repeat(*reps), 0)


@op("Range", args=(0, 1, 2))
def _range(g, n, ins: list[In]):
    start, limit, delta = (np.ravel(ins[i].array(w)) for i, w in enumerate(("start", "limit", "delta")))
    return Folded(np.arange(start[0], limit[0], delta[0], dtype=start.dtype))
