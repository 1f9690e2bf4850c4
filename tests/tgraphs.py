"""A builder of transformer-shaped ONNX graphs for tests, spelled as exporters spell them: token streams ``[N, T, C]``
with LayerNorm (fused or decomposed), attention with fused or separate Q/K/V and the head-split Reshape/Transpose
constants (or targets read at run time from ``Shape``), window partitions, channels-last blocks, and the C2PSA
per-head split. Every builder returns tensor names; :meth:`TG.model` makes the model."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Names
from onnx import TensorProto, helper


class TG(Names):
    def __init__(
        self,
        tokens: int = 6,
        channels: int = 8,
        *,
        seed: int = 0,
        dynamic_batch: bool = True,
        opset: int = 17,
        image: tuple[int, int, int] | None = None,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self.dynamic = dynamic_batch
        batch = "N" if dynamic_batch else 1
        self.shape: dict[str, list] = {}
        if image is None:
            self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens, channels])]
            self.shape["x"] = [batch, tokens, channels]
        else:
            self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *image])]
            self.shape["x"] = [batch, *image]
        self._n = 0

    # basics (name, const: graphs.Names) -------------------------------------------------------------------------

    def ints(self, values) -> str:
        return self.const(np.array(values, dtype=np.int64), "shape")

    def weight(self, *shape, scale: float = 0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32), "w")

    def op(self, op_type: str, inputs: list[str], *, outputs: int = 1, shape=None, **attrs):
        name = self.name(op_type.lower())
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        if shape is not None:
            for o in outs:
                self.shape[o] = list(shape)
        elif inputs and inputs[0] in self.shape:
            for o in outs:
                self.shape[o] = list(self.shape[inputs[0]])
        return outs[0] if outputs == 1 else outs

    def width(self, x: str) -> int:
        return int(self.shape[x][-1])

    def target(self, x: str, dims: list[int], *, from_shape: bool | None = None) -> str:
        """A Reshape target: constants, or (dynamic batch) the batch read at run time as exporters write it."""
        if from_shape is None:
            from_shape = self.dynamic or dims[0] is None
        if not from_shape:
            return self.ints(dims)
        b = self.op("Gather", [self.op("Shape", [x], shape=[len(self.shape[x])]), self.const(np.array(0))], shape=[])
        b = self.op("Unsqueeze", [b, self.ints([0])], shape=[1])
        return self.op("Concat", [b, *(self.ints([d]) for d in dims[1:])], axis=0, shape=[len(dims)])

    def reshape(self, x: str, dims: list[int], *, from_shape: bool | None = None) -> str:
        out = [self.shape[x][0], *dims[1:]]
        return self.op("Reshape", [x, self.target(x, dims, from_shape=from_shape)], shape=out)

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", [x], perm=perm, shape=[self.shape[x][p] for p in perm])

    # layers -----------------------------------------------------------------------------------------------------
    def linear(self, x: str, cout: int, *, bias: bool = True) -> str:
        y = self.op("MatMul", [x, self.weight(self.width(x), cout)], shape=[*self.shape[x][:-1], cout])
        if bias:
            y = self.op(
                "Add",
                [self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b"), y],
                shape=self.shape[y],
            )
        return y

    def gelu(self, x: str) -> str:
        d = self.op("Div", [x, self.const(np.array(1.4142135, np.float32))])
        e = self.op("Add", [self.op("Erf", [d]), self.const(np.array(1.0, np.float32))])
        return self.op("Mul", [self.op("Mul", [x, e]), self.const(np.array(0.5, np.float32))])

    def layer_norm(self, x: str, kind: str = "fused") -> str:
        """LayerNorm over the last axis: ``fused`` (LayerNormalization), ``decomposed`` (ReduceMean/Sub/Pow/...,
        as opset < 17 exports write it) or ``rms`` (RMSNorm: x / sqrt(mean(x^2) + eps) * g)."""
        c = self.width(x)
        g = self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "ln_g")
        b = self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "ln_b")
        if kind == "fused":
            return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-5)
        eps = self.const(np.array(1e-5, np.float32))
        if kind == "rms":
            ms = self.mean_last(self.op("Pow", [x, self.const(np.array(2.0, np.float32))]), x)
            y = self.op("Div", [x, self.op("Sqrt", [self.op("Add", [ms, eps])])])
            return self.op("Mul", [y, g])
        mu = self.mean_last(x, x)
        d = self.op("Sub", [x, mu])
        var = self.mean_last(self.op("Pow", [d, self.const(np.array(2.0, np.float32))]), x)
        y = self.op("Div", [d, self.op("Sqrt", [self.op("Add", [var, eps])])])
        return self.op("Add", [self.op("Mul", [y, g]), b])

    def mean_last(self, x: str, like: str) -> str:
        shape = [*self.shape[like][:-1], 1]
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints([-1])], keepdims=1, shape=shape)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1, shape=shape)

    def attention(
        self,
        x: str,
        heads: int,
        head_dim: int,
        *,
        fused: bool = True,
        gather: bool = False,
        bias_heads: bool = False,
        v_dim: int | None = None,
    ) -> str:
        """Multi-head self-attention on ``x`` ``[N, T, C]`` as timm (fused QKV: Reshape [N,T,3,H,D], Transpose,
        Split/Squeeze or Gather) or transformers (separate projections) export it; ``bias_heads``: a per-head constant
        added to the scores (Swin's relative position bias)."""
        n, t = self.shape[x][0], self.shape[x][1]
        dv = v_dim or head_dim
        if fused:
            assert dv == head_dim
            qkv = self.linear(x, 3 * heads * head_dim)
            r = self.reshape(qkv, [n, t, 3, heads, head_dim])
            p = self.transpose(r, [2, 0, 3, 1, 4])  # [3, N, H, T, D]
            if gather:
                q, k, v = (
                    self.op("Gather", [p, self.const(np.array(i))], axis=0, shape=self.shape[p][1:]) for i in range(3)
                )
            else:
                parts = self.op("Split", [p, self.ints([1, 1, 1])], outputs=3, axis=0, shape=[1, *self.shape[p][1:]])
                q, k, v = (self.op("Squeeze", [s, self.ints([0])], shape=self.shape[p][1:]) for s in parts)
        else:
            q, k, v = (
                self.transpose(self.reshape(self.linear(x, heads * d), [n, t, heads, d]), [0, 2, 1, 3])
                for d in (head_dim, head_dim, dv)
            )
        kt = self.transpose(k, [0, 1, 3, 2])
        q = self.op("Mul", [q, self.const(np.array(head_dim**-0.5, np.float32))])
        s = self.op("MatMul", [q, kt], shape=[n, heads, t, t])
        if bias_heads:
            s = self.op("Add", [s, self.const(self.rng.standard_normal((1, heads, t, t)).astype(np.float32), "rpb")])
        a = self.op("Softmax", [s], axis=-1)
        o = self.op("MatMul", [a, v], shape=[n, heads, t, dv])
        o = self.reshape(self.transpose(o, [0, 2, 1, 3]), [n, t, heads * dv])
        return self.linear(o, self.width(x))

    def mlp(self, x: str, hidden: int) -> str:
        return self.linear(self.gelu(self.linear(x, hidden)), self.width(x))

    def block(self, x: str, heads: int, head_dim: int, *, norm: str = "fused", pre: bool = True, **attn) -> str:
        """A transformer block: pre-LN (ViT) or post-LN (BERT) residuals around attention and an MLP."""
        if pre:
            x = self.op("Add", [x, self.attention(self.layer_norm(x, norm), heads, head_dim, **attn)])
            return self.op("Add", [x, self.mlp(self.layer_norm(x, norm), 2 * self.width(x))])
        x = self.layer_norm(self.op("Add", [x, self.attention(x, heads, head_dim, **attn)]), norm)
        return self.layer_norm(self.op("Add", [x, self.mlp(x, 2 * self.width(x))]), norm)

    def head(self, x: str, classes: int = 3) -> str:
        """Mean over tokens, then a classifier."""
        if self.opset >= 18:
            p = self.op("ReduceMean", [x, self.ints([1])], keepdims=0, shape=[self.shape[x][0], self.width(x)])
        else:
            p = self.op("ReduceMean", [x], axes=[1], keepdims=0, shape=[self.shape[x][0], self.width(x)])
        return self.op(
            "Gemm",
            [p, self.weight(classes, self.width(x)), self.const(np.zeros(classes, np.float32))],
            transB=1,
            shape=[self.shape[x][0], classes],
        )

    def windows(self, x: str, h: int, w: int, win: int) -> tuple[str, callable]:
        """Swin's window partition of ``x`` ``[N, h*w, C]``: returns ``[N*nW, win*win, C]`` and the reverse."""
        n, c = self.shape[x][0], self.width(x)
        y = self.reshape(x, [n, h // win, win, w // win, win, c])
        y = self.transpose(y, [0, 1, 3, 2, 4, 5])
        y = self.op("Reshape", [y, self.ints([-1, win * win, c])], shape=[None, win * win, c])

        def reverse(z: str) -> str:
            z = self.op(
                "Reshape",
                [z, self.ints([-1, h // win, w // win, win, win, c])],
                shape=[None, h // win, w // win, win, win, c],
            )
            z = self.transpose(z, [0, 1, 3, 2, 4, 5])
            return self.op("Reshape", [z, self.ints([-1, h * w, c])], shape=[n, h * w, c])

        return y, reverse

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "t", self.inputs, outs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        return m
