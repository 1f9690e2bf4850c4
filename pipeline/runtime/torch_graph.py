"""Run an ONNX graph with PyTorch: a small interpreter over the op subset CNNs use.

:class:`TorchGraph` is an ``nn.Module`` built from a :class:`~pipeline.graph.Model`:

* floating-point initializers become ``nn.Parameter``s, so gradients flow to them (loss-based criteria) and
  :meth:`TorchGraph.write_back` copies trained values into the very same ONNX initializers;
* integer constants (shapes, axes, pads) stay Python values on the CPU, and shape arithmetic (``Shape -> Gather ->
  Concat -> Reshape``) is done on CPU tensors: a run on the GPU never waits on the host, so it can be captured in a
  CUDA graph;
* ``forward(x, capture=[names])`` also returns intermediate tensors (activations for criteria and repairs).

It is the engine of the ``torch-cuda`` backend (real GPU speed-ups on machines with PyTorch + CUDA but no TensorRT) and
runs on the CPU as well, where tests compare it with ONNX Runtime. An unsupported op raises a :class:`CarveError`
naming the node and the supported ops.
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
from torch import nn

from pipeline.errors import CarveError
from pipeline.graph.conv import resolve_pads
from pipeline.graph.model import Model

OPS: dict[str, Callable] = {}


def op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return deco


_DTYPES = {
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


class Node:
    """What the interpreter needs of an ONNX node."""

    __slots__ = ("name", "op", "inputs", "outputs", "attrs", "fn")

    def __init__(self, n: onnx.NodeProto, fn: Callable) -> None:
        self.name, self.op, self.fn = n.name, n.op_type, fn
        self.inputs, self.outputs = list(n.input), list(n.output)
        self.attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        for k, v in list(self.attrs.items()):
            if isinstance(v, bytes):
                self.attrs[k] = v.decode()
            elif isinstance(v, onnx.TensorProto):
                self.attrs[k] = numpy_helper.to_array(v)

    def a(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def _is_float(t: onnx.TensorProto) -> bool:
    return t.data_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.BFLOAT16,
    )


def _safe(name: str) -> str:
    return "p_" + "".join(ch if ch.isalnum() else "_" for ch in name)


class TorchGraph(nn.Module):
    """An ONNX model as a PyTorch module (see the module docstring)."""

    def __init__(self, model: Model, *, trainable: bool = True) -> None:
        super().__init__()
        self.opset = model.opset
        self.input_names = list(model.input_names)
        self.output_names = list(model.output_names)
        unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in OPS})
        if unsupported:
            node = next(n for n in model.graph.node if n.op_type == unsupported[0])
            raise CarveError(
                f"the PyTorch runner does not support op {unsupported[0]} (node {node.name!r})",
                hint=f"supported ops: {', '.join(sorted(OPS))}",
            )
        self.nodes = [Node(n, OPS[n.op_type]) for n in model.graph.node]
        # BatchNormalization in train(): batch statistics when True (fine-tuning), running statistics otherwise
        self.bn_training = False
        self.params = nn.ParameterDict()
        self.param_of: dict[str, str] = {}
        self.consts: dict[str, Any] = {}  # integer/bool constants: CPU tensors (shape math never leaves the host)
        used = {i for n in model.graph.node for i in n.input}
        # running statistics are not learned (and torch's batch_norm refuses gradients for them)
        statistics = {i for n in model.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:5]}
        for t in model.graph.initializer:
            if t.name not in used:
                continue
            arr = numpy_helper.to_array(t)
            if _is_float(t):
                key = _safe(t.name)
                grad = trainable and t.name not in statistics
                self.params[key] = nn.Parameter(torch.from_numpy(np.array(arr)), requires_grad=grad)
                self.param_of[t.name] = key
            else:
                self.consts[t.name] = torch.from_numpy(np.array(arr))

    # -- running ---------------------------------------------------------------------------------------------------
    def forward(self, *args: torch.Tensor, capture: Sequence[str] = (), **feeds: torch.Tensor):
        env: dict[str, Any] = dict(self.consts)
        for k, key in self.param_of.items():
            env[k] = self.params[key]
        for name, value in zip(self.input_names, args):
            env[name] = value
        env.update(feeds)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise CarveError(f"missing input {missing[0]!r}; the model takes {self.input_names}")
        for node in self.nodes:
            ins = [env[i] if i else None for i in node.inputs]
            try:
                outs = node.fn(self, node, ins)
            except CarveError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{node.op} {node.name!r}: {exc}") from exc
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for o, v in zip(node.outputs, outs):
                if o:
                    env[o] = v
        result = tuple(env[o] for o in self.output_names)
        if capture:
            return (result[0] if len(result) == 1 else result), {c: env[c] for c in capture}
        return result[0] if len(result) == 1 else result

    def parameter(self, initializer: str) -> nn.Parameter:
        return self.params[self.param_of[initializer]]

    def write_back(self, model: Model, only=None) -> None:
        """Copy the (trained) parameters into the model's initializers of the same names (``only``: just these)."""
        with torch.no_grad():
            for name, key in self.param_of.items():
                if name in model.init and (only is None or name in only):
                    model.set_array(
                        name, self.params[key].detach().float().cpu().numpy().astype(model.array(name).dtype)
                    )


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def ints(v: Any) -> list[int]:
    """A shape-like value (CPU tensor, array, list) as Python ints."""
    if v is None:
        return []
    if isinstance(v, torch.Tensor):
        return [int(x) for x in v.reshape(-1).tolist()]
    return [int(x) for x in np.ravel(v)]


def floats(v: Any) -> list[float]:
    if isinstance(v, torch.Tensor):
        return [float(x) for x in v.detach().reshape(-1).tolist()]
    return [float(x) for x in np.ravel(v)]


def _on(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.device) if isinstance(x, torch.Tensor) and x.device != like.device else x


def _pads_2d(node: Node, x: torch.Tensor, kernel: list[int], strides: list[int], dil: list[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved."""
    return resolve_pads(node.a("auto_pad", "NOTSET"), node.a("pads"), list(x.shape[2:]), kernel, strides, dil)


def _sym_or_pad(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Symmetric pads go to the op; asymmetric ones are applied with F.pad first."""
    nd = len(pads) // 2
    b, e = pads[:nd], pads[nd:]
    if b == e:
        return x, b
    torch_pads = []
    for k in reversed(range(nd)):
        torch_pads += [b[k], e[k]]
    return F.pad(x, torch_pads, value=value), [0] * nd


# ----------------------------------------------------------------------------------------------------------------------
# ops


def _conv_args(n: Node, ins):
    """(x, weight, bias, spatial dims, strides, dilations) of a Conv / ConvTranspose."""
    x, w, b = ins[0], ins[1], (ins[2] if len(ins) > 2 else None)
    nd = w.dim() - 2
    return x, w, b, nd, ints(n.a("strides", [1] * nd)), ints(n.a("dilations", [1] * nd))


@op("Conv")
def _conv(g, n: Node, ins):
    x, w, b, nd, strides, dil = _conv_args(n, ins)
    x, pads = _sym_or_pad(x, _pads_2d(n, x, list(w.shape[2:]), strides, dil))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, strides, pads, dil, int(n.a("group", 1)))


@op("ConvTranspose")
def _conv_t(g, n: Node, ins):
    x, w, b, nd, strides, dil = _conv_args(n, ins)
    pads = ints(n.a("pads", [0] * (2 * nd)))
    out_pad = ints(n.a("output_padding", [0] * nd))
    if n.a("output_shape") is not None or n.a("auto_pad", "NOTSET") != "NOTSET" or pads[:nd] != pads[nd:]:
        raise CarveError(
            f"ConvTranspose {n.name!r}: output_shape/auto_pad/asymmetric pads are not supported by the PyTorch runner"
        )
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    return fn(x, w, b, strides, pads[:nd], out_pad, int(n.a("group", 1)), dil)


@op("BatchNormalization")
def _bn(g, n: Node, ins):
    x, scale, bias, mean, var = ins[:5]
    eps = float(n.a("epsilon", 1e-5))
    if g.training and g.bn_training:
        # batch statistics, running statistics updated in place (ONNX: running = m running + (1 - m) batch; torch's
        # momentum is the weight of the batch)
        return F.batch_norm(x, mean, var, scale, bias, True, 1.0 - float(n.a("momentum", 0.9)), eps)
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


@op("InstanceNormalization")
def _in(g, n: Node, ins):
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=float(n.a("epsilon", 1e-5)))


@op("LRN")
def _lrn(g, n: Node, ins):
    return F.local_response_norm(
        ins[0], int(n.a("size")), float(n.a("alpha", 1e-4)), float(n.a("beta", 0.75)), float(n.a("bias", 1.0))
    )


@op("Gemm")
def _gemm(g, n: Node, ins):
    a, b = ins[0], ins[1]
    if n.a("transA", 0):
        a = a.t()
    if n.a("transB", 0):
        b = b.t()
    y = float(n.a("alpha", 1.0)) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + float(n.a("beta", 1.0)) * ins[2]
    return y


@op("MatMul")
def _matmul(g, n, ins):
    return ins[0] @ ins[1]


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
}


@op(*_UNARY)
def _unary(g, n: Node, ins):
    return _UNARY[n.op](ins[0])


@op("Identity")
def _identity(g, n, ins):
    return ins[0]


@op("Dropout")
def _dropout(g, n: Node, ins):
    return ins[0], torch.ones_like(ins[0], dtype=torch.bool)


@op("LeakyRelu")
def _leaky(g, n: Node, ins):
    return F.leaky_relu(ins[0], float(n.a("alpha", 0.01)))


@op("Elu")
def _elu(g, n: Node, ins):
    return F.elu(ins[0], float(n.a("alpha", 1.0)))


@op("Celu")
def _celu(g, n: Node, ins):
    return F.celu(ins[0], float(n.a("alpha", 1.0)))


@op("Selu")
def _selu(g, n: Node, ins):
    alpha, gamma = float(n.a("alpha", 1.6732632423543772)), float(n.a("gamma", 1.0507009873554805))
    return gamma * torch.where(ins[0] > 0, ins[0], alpha * (torch.exp(ins[0]) - 1))


@op("Softplus")
def _softplus(g, n, ins):
    return F.softplus(ins[0])


@op("ThresholdedRelu")
def _trelu(g, n: Node, ins):
    return torch.where(ins[0] > float(n.a("alpha", 1.0)), ins[0], torch.zeros_like(ins[0]))


@op("Gelu")
def _gelu(g, n: Node, ins):
    return F.gelu(ins[0], approximate=n.a("approximate", "none"))


@op("HardSigmoid")
def _hsig(g, n: Node, ins):
    return torch.clamp(float(n.a("alpha", 0.2)) * ins[0] + float(n.a("beta", 0.5)), 0, 1)


@op("HardSwish")
def _hswish(g, n, ins):
    return F.hardswish(ins[0])


@op("PRelu")
def _prelu(g, n, ins):
    x, slope = ins
    return torch.where(x >= 0, x, slope * x)


@op("Clip")
def _clip(g, n: Node, ins):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else n.a("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else n.a("max")
    if isinstance(lo, torch.Tensor):
        lo = float(lo.detach().reshape(-1)[0]) if lo.device.type == "cpu" else lo
    if isinstance(hi, torch.Tensor):
        hi = float(hi.detach().reshape(-1)[0]) if hi.device.type == "cpu" else hi
    return torch.clamp(x, lo, hi)


def _binary(fn):
    def run(g, n, ins):
        a, b = ins[0], ins[1]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            b = _on(b, a) if a.dim() else b
            a = _on(a, b)
        return fn(a, b)

    return run


for _name, _fn in {
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
}.items():
    OPS[_name] = _binary(_fn)


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


OPS["Div"] = _binary(_div)
OPS["Mod"] = _binary(torch.fmod)


@op("Max", "Min", "Sum", "Mean")
def _nary(g, n: Node, ins):
    out = ins[0]
    for v in ins[1:]:
        v = _on(v, out)
        out = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}[n.op](out, v)
    return out / len(ins) if n.op == "Mean" else out


@op("Where")
def _where(g, n, ins):
    c, a, b = ins
    return torch.where(_on(c, a), a, _on(b, a))


def _pool_args(n: Node, x):
    kernel = ints(n.a("kernel_shape"))
    nd = len(kernel)
    strides = ints(n.a("strides", [1] * nd))
    dil = ints(n.a("dilations", [1] * nd))
    return kernel, strides, dil, _pads_2d(n, x, kernel, strides, dil)


@op("MaxPool")
def _maxpool(g, n: Node, ins):
    x = ins[0]
    kernel, strides, dil, pads = _pool_args(n, x)
    x, p = _sym_or_pad(x, pads, value=float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return fn(x, kernel, strides, p, dil, ceil_mode=bool(n.a("ceil_mode", 0)))


@op("AveragePool")
def _avgpool(g, n: Node, ins):
    x = ins[0]
    kernel, strides, _, pads = _pool_args(n, x)
    include = bool(n.a("count_include_pad", 0))
    nd = len(kernel)
    if pads[:nd] != pads[nd:] and not include:
        raise CarveError(f"AveragePool {n.name!r}: asymmetric pads without count_include_pad are not supported")
    x, p = _sym_or_pad(x, pads)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    return fn(x, kernel, strides, p, ceil_mode=bool(n.a("ceil_mode", 0)), count_include_pad=include)


@op("GlobalAveragePool")
def _gap(g, n, ins):
    return ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(g, n, ins):
    return ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True)


@op("Resize", "Upsample")
def _resize(g, n: Node, ins):
    x = ins[0]
    if n.op == "Upsample":
        scales = floats(ins[1])
        sizes = None
    else:
        scales = floats(ins[2]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else None
        sizes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    mode = n.a("mode", "nearest")
    ctm = n.a("coordinate_transformation_mode", "half_pixel" if n.op == "Resize" else "asymmetric")
    if sizes is None:
        if scales[:2] != [1.0, 1.0]:
            raise CarveError(f"Resize {n.name!r} scales the batch or channel axis")
        out = [int(math.floor(s * f)) for s, f in zip(x.shape[2:], scales[2:])]
    else:
        out = sizes[2:]
    if mode == "nearest":
        nearest = n.a("nearest_mode", "round_prefer_floor")
        if ctm == "asymmetric" and nearest == "floor":
            return F.interpolate(x, size=out, mode="nearest")
        if ctm in ("half_pixel", "pytorch_half_pixel") and nearest in ("round_prefer_ceil", "round_prefer_floor"):
            return F.interpolate(x, size=out, mode="nearest-exact")
        raise CarveError(f"Resize {n.name!r}: nearest with {ctm}/{nearest} is not supported by the PyTorch runner")
    if mode == "linear":
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        if ctm == "align_corners":
            return F.interpolate(x, size=out, mode=torch_mode, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=out, mode=torch_mode, align_corners=False)
    raise CarveError(f"Resize {n.name!r}: mode {mode} with {ctm} is not supported by the PyTorch runner")


@op("Pad")
def _pad(g, n: Node, ins):
    x = ins[0]
    pads = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else ints(n.a("pads"))
    value = floats(ins[2])[0] if len(ins) > 2 and ins[2] is not None else float(n.a("value", 0.0))
    axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(x.dim()))
    axes = [a % x.dim() for a in axes]
    k = len(axes)
    full_b, full_e = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        full_b[a], full_e[a] = pads[i], pads[i + k]
    torch_pads = []
    for a in reversed(range(x.dim())):
        torch_pads += [full_b[a], full_e[a]]
    mode = n.a("mode", "constant")
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    lead = 2 * (x.dim() - 2)  # reflect/replicate pad only spatial dims in torch
    if any(torch_pads[lead:]):
        raise CarveError(f"Pad {n.name!r}: {mode} padding of the batch or channel axis is not supported")
    return F.pad(x, torch_pads[:lead], mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


@op("Concat")
def _concat(g, n: Node, ins):
    ins = [v for v in ins if v is not None]
    dev = next((v.device for v in ins if v.device.type != "cpu"), None)
    if dev is not None:
        ins = [v.to(dev) for v in ins]
    return torch.cat(ins, dim=int(n.a("axis")))


@op("Split")
def _split(g, n: Node, ins):
    x = ins[0]
    axis = int(n.a("axis", 0)) % x.dim()
    if len(ins) > 1 and ins[1] is not None:
        sizes = ints(ins[1])
    elif n.a("split") is not None:
        sizes = ints(n.a("split"))
    else:
        k = int(n.a("num_outputs", len(n.outputs)))
        step = -(-x.shape[axis] // k)
        sizes = [min(step, x.shape[axis] - i * step) for i in range(k)]
    return list(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(g, n: Node, ins):
    x = ins[0]
    starts, ends = ints(ins[1]), ints(ins[2])
    axes = ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        if st < 0:
            size = x.shape[a]
            idx = list(range(size))[slice(s, e, st)]
            x = x.index_select(a, torch.tensor(idx, dtype=torch.long, device=x.device))
            continue
        index[a] = slice(s, e, st)
    return x[tuple(index)]


@op("Gather")
def _gather(g, n: Node, ins):
    x, idx = ins
    axis = int(n.a("axis", 0)) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if x.device.type == "cpu" and not x.is_floating_point():
        idx = idx.cpu()
    else:
        idx = idx.to(x.device)
    flat = x.index_select(axis, idx.reshape(-1))
    return flat.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


@op("Flatten")
def _flatten(g, n: Node, ins):
    x = ins[0]
    axis = int(n.a("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


@op("Reshape")
def _reshape(g, n: Node, ins):
    x, shape = ins[0], ints(ins[1])
    if not n.a("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Transpose")
def _transpose(g, n: Node, ins):
    perm = n.a("perm")
    return ins[0].permute(*(ints(perm) if perm is not None else reversed(range(ins[0].dim()))))


@op("Squeeze")
def _squeeze(g, n: Node, ins):
    x = ins[0]
    axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else n.a("axes")
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in ints(axes)), reverse=True):
        x = x.squeeze(a)
    return x


@op("Unsqueeze")
def _unsqueeze(g, n: Node, ins):
    x = ins[0]
    axes = ints(ins[1]) if len(ins) > 1 and ins[1] is not None else ints(n.a("axes"))
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _axes(n: Node, ins, rank: int) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        axes = ints(ins[1])
    else:
        axes = n.a("axes")
        axes = ints(axes) if axes is not None else None
    if not axes:
        return None if not n.a("noop_with_empty_axes", 0) else []
    return [a % rank for a in axes]


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL2": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt(),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


@op(*_REDUCE)
def _reduce(g, n: Node, ins):
    x = ins[0]
    axes = _axes(n, ins, x.dim())
    if axes == []:
        return x
    dims = tuple(range(x.dim())) if axes is None else tuple(axes)
    return _REDUCE[n.op](x, dims, bool(n.a("keepdims", 1)))


@op("ArgMax", "ArgMin")
def _arg(g, n: Node, ins):
    fn = torch.argmax if n.op == "ArgMax" else torch.argmin
    return fn(ins[0], dim=int(n.a("axis", 0)), keepdim=bool(n.a("keepdims", 1)))


@op("Softmax", "LogSoftmax")
def _softmax(g, n: Node, ins):
    x = ins[0]
    fn = F.softmax if n.op == "Softmax" else F.log_softmax
    if g.opset >= 13:
        return fn(x, dim=int(n.a("axis", -1)))
    axis = int(n.a("axis", 1)) % x.dim()  # opset < 13: coerced to 2-D at axis
    flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
    return fn(flat, dim=1).reshape(x.shape)


@op("Cast")
def _cast(g, n: Node, ins):
    return ins[0].to(_DTYPES[int(n.a("to"))])


@op("CastLike")
def _castlike(g, n, ins):
    return ins[0].to(ins[1].dtype)


@op("Shape")
def _shape(g, n: Node, ins):
    dims = list(ins[0].shape)
    start, end = int(n.a("start", 0)), n.a("end")
    return torch.tensor(dims[start:end], dtype=torch.int64)


@op("Size")
def _size(g, n, ins):
    return torch.tensor(ins[0].numel(), dtype=torch.int64)


@op("ConstantOfShape")
def _const_of_shape(g, n: Node, ins):
    value = n.a("value")
    v = torch.from_numpy(np.array(value)).reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(ints(ins[0]), v.item(), dtype=v.dtype)


@op("Constant")
def _constant(g, n: Node, ins):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if n.a(key) is not None:
            return torch.from_numpy(np.array(n.a(key)))
    raise CarveError(f"Constant {n.name!r}: unsupported value kind")


@op("Expand")
def _expand(g, n: Node, ins):
    x, shape = ins[0], ints(ins[1])
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return x.expand(target)


@op("Tile")
def _tile(g, n, ins):
    return ins[0].repeat(*ints(ins[1]))


@op("Range")
def _range(g, n, ins):
    start, limit, delta = (v.reshape(-1)[0].item() for v in ins)
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)
