"""A tiny builder of ONNX CNN graphs for tests, and the exactness check every pruning test relies on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import carve as P
from carve.pipeline import graph as cgraph
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.surgery import prune, reference
from carve.pipeline.pruning.allocator import balance_lockstep
from carve.pipeline.runtime import ort as ortutil


class Names:
    """What the graph builders (:class:`G`, ``tgraphs.TG``) share: fresh tensor names and constant initializers."""

    _n: int
    inits: list[onnx.TensorProto]

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def const(self, arr, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name


class G(Names):
    """Build a graph op by op. Channel counts are tracked so layers can be chained without bookkeeping."""

    def __init__(self, shape=(1, 3, 8, 8), *, opset: int = 17, seed: int = 0, dynamic_batch: bool = True) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.channels: dict[str, int] = {"x": shape[1]}
        dims = ["N", *shape[1:]] if dynamic_batch else list(shape)
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
        self._n = 0

    def weight(self, *shape, base: str = "w") -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32) * 0.5, base)

    def op(self, op_type: str, inputs: list[str], *, outputs: int = 1, channels: int | None = None, **attrs) -> str:
        name = self.name(op_type.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        c = channels if channels is not None else self.channels.get(inputs[0]) if inputs else None
        for o in outs:
            if c is not None:
                self.channels[o] = c
        return outs[0] if outputs == 1 else outs

    # layers ---------------------------------------------------------------------------------------------------------
    def conv(self, x: str, cout: int, k: int = 3, *, stride: int = 1, group: int = 1, bias: bool = True) -> str:
        cin = self.channels[x]
        ins = [x, self.weight(cout, cin // group, k, k)]
        if bias:
            ins.append(self.const(self.rng.standard_normal(cout).astype(np.float32) * 0.1, "b"))
        return self.op(
            "Conv", ins, channels=cout, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2, group=group
        )

    def dw(self, x: str, k: int = 3, mult: int = 1) -> str:
        c = self.channels[x]
        return self.conv(x, c * mult, k, group=c)

    def bn(self, x: str) -> str:
        c = self.channels[x]
        r = self.rng
        p = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 2, c)]
        return self.op("BatchNormalization", [x, *[self.const(v.astype(np.float32), "bn") for v in p]])

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def prelu(self, x: str) -> str:
        c = self.channels[x]
        return self.op("PRelu", [x, self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32), "slope")])

    def subsample(self, x: str) -> str:
        """``x[:, :, ::2, ::2]`` as the exporter writes it (the option-A shortcut's spatial stride)."""
        bounds = [np.array(v, np.int64) for v in ([0, 0], [99, 99], [2, 3], [2, 2])]
        return self.op("Slice", [x, *(self.const(b) for b in bounds)])

    def add(self, a: str, b: str) -> str:
        return self.op("Add", [a, b])

    def concat(self, *xs: str) -> str:
        return self.op("Concat", list(xs), channels=sum(self.channels[x] for x in xs), axis=1)

    def split(self, x: str, sizes: list[int]) -> list[str]:
        s = self.const(np.array(sizes, dtype=np.int64), "split")
        outs = self.op("Split", [x, s], outputs=len(sizes), axis=1)
        outs = [outs] if isinstance(outs, str) else outs
        for o, n in zip(outs, sizes):
            self.channels[o] = n
        return outs

    def se(self, x: str, r: int = 2) -> str:
        c = self.channels[x]
        s = self.op("GlobalAveragePool", [x])
        s = self.relu(self.conv(s, max(1, c // r), 1))
        s = self.op("Sigmoid", [self.conv(s, c, 1)])
        return self.op("Mul", [x, s])

    def pad_channels(self, x: str, before: int, after: int) -> str:
        pads = self.const(np.array([0, before, 0, 0, 0, after, 0, 0], dtype=np.int64), "pads")
        return self.op("Pad", [x, pads], channels=self.channels[x] + before + after, mode="constant")

    def head(self, x: str, classes: int = 5, *, flatten_spatial: bool = False) -> str:
        if not flatten_spatial:
            x = self.op("GlobalAveragePool", [x])
            feat = self.channels[x]
        else:
            feat = None
        f = self.op("Flatten", [x], axis=1)
        if feat is None:
            feat = self.flat_features(x)
        w = self.weight(classes, feat)
        b = self.const(np.zeros(classes, dtype=np.float32), "fcb")
        return self.op("Gemm", [f, w, b], channels=classes, transB=1)

    def flat_features(self, x: str) -> int:
        m = self.model([x])
        shp = cgraph.infer_shapes(m)[x]
        return int(np.prod(shp[1:]))

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, outs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        return m


def analyse_proto(proto: onnx.ModelProto):
    model = cgraph.from_proto(proto)
    return model, P.analyse(model)


def random_removal(analysis, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """A random plan: each prunable unit removed with probability p, never emptying a tensor; heads of an attention
    keep equal widths (lockstep sets balanced, as the planner does)."""
    removed = (rng.random(analysis.n_units) < p) & ~analysis.unit_frozen
    scores = rng.random(analysis.n_units)
    layouts = [*analysis.tensors.values(), *analysis.blocks.values()]
    while True:
        removed = balance_lockstep(analysis, removed, scores)  # only ever gives units back
        emptied = False
        for chan in layouts:
            units = analysis.unit_of[chan.ids].reshape(-1)
            if len(units) and removed[units].all():
                removed[units[0]] = False
                emptied = True
        if not emptied:
            return removed


def assert_exact(model, plan: Plan, *, batch: int = 2, seed: int = 0, rtol: float = 1e-5):
    """The pruned model equals the original with removed consumer columns zeroed (activation products masked where
    they contract removed channels, LayerNorm statistics over the kept channels); returns the pruned model."""
    pruned = prune(model, plan)
    ref = reference(model, plan)
    feeds = ortutil.random_feeds(model, batch=batch, seed=seed)
    for a, b in zip(ortutil.run(ref, feeds), ortutil.run(pruned, feeds)):
        assert a.shape == b.shape
        # float32 rounding follows the magnitude of the intermediates, not of the output: random transformer blocks
        # can end in outputs ~1e-2 computed from activations ~1, so the scale never drops below 1
        scale = max(float(np.abs(a).max()), 1.0)
        np.testing.assert_allclose(b, a, rtol=0, atol=rtol * scale + 1e-6)
    return pruned


def manual_plan(analysis, removed: np.ndarray) -> Plan:
    return Plan(analysis, np.asarray(removed, dtype=bool))


def if_model(condition_from_data: bool, name: str = "branch") -> onnx.ModelProto:
    """Conv -> Relu -> If(cond) { Relu } else { Sigmoid }: the If reads the conv's channels from the outer scope."""
    g = G()
    a = g.relu(g.conv("x", 8))
    then = helper.make_graph(
        [helper.make_node("Relu", [a], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Sigmoid", [a], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    if condition_from_data:  # decided at run time: whether the mean activation is positive
        mean = g.op("ReduceMean", [a], keepdims=0)
        cond = g.op("Greater", [mean, g.const(np.array(0.0, np.float32))])
    else:
        cond = g.const(np.array(True))
    g.nodes.append(helper.make_node("If", [cond], ["y"], name=name, then_branch=then, else_branch=other))
    return g.model(["y"])
