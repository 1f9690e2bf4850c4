"""Hypothesis strategies shared by the property tests and the fuzz suite: random small CNNs built op by op with
tests/graphs.py (every block the channel analysis knows: residuals, option-A pads, concat, split, SE, pools, slices,
resizes, grouped and depthwise convolutions, extra heads)."""

from __future__ import annotations

import numpy as np
from graphs import G
from hypothesis import strategies as st

BLOCKS = [
    "conv",
    "dw",
    "res",
    "res_pad",
    "concat",
    "split",
    "se",
    "pool",
    "act",
    "slice",
    "resize",
    "grouped",
    "fc_mid",
]
ACTS = ["Relu", "LeakyRelu", "PRelu", "HardSwish", "SiLU", "Sigmoid", "Clip", "Tanh"]


@st.composite
def cnn(draw):
    seed = draw(st.integers(0, 2**16))
    g = G((1, 3, 8, 8), seed=seed, opset=draw(st.sampled_from([14, 17])))  # HardSwish needs 14
    x = g.relu(g.conv("x", draw(st.integers(2, 8))))
    hw = 8
    outputs = []
    for block in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6)):
        c = g.channels[x]
        if block == "conv":
            stride = 2 if hw >= 4 and draw(st.booleans()) else 1
            x = g.conv(
                x, draw(st.integers(1, 10)), draw(st.sampled_from([1, 3])), stride=stride, bias=draw(st.booleans())
            )
            hw = -(-hw // stride)
            if draw(st.booleans()):
                x = g.bn(x)
            x = act(g, x, draw(st.sampled_from(ACTS)))
        elif block == "dw":
            x = act(g, g.dw(x, mult=draw(st.sampled_from([1, 1, 2]))), draw(st.sampled_from(ACTS)))
        elif block == "res":
            r = g.conv(g.relu(g.conv(x, draw(st.integers(1, 8)))), c)
            x = g.relu(g.add(x, r))
        elif block == "res_pad" and hw >= 2:
            extra = draw(st.integers(1, 4))
            sub = g.subsample(x)
            sc = g.pad_channels(sub, extra, extra)
            r = g.bn(g.conv(g.relu(g.conv(x, c + 2 * extra, stride=2)), c + 2 * extra))
            x = g.relu(g.add(r, sc))
            hw = -(-hw // 2)
        elif block == "concat":
            branches = [g.relu(g.conv(x, draw(st.integers(1, 6)), 1)) for _ in range(draw(st.integers(1, 3)))]
            if draw(st.booleans()):
                branches.append(x)  # dense connection
            x = g.concat(*branches)
        elif block == "split" and c >= 2:
            k = draw(st.integers(1, c - 1))
            a, b = g.split(x, [k, c - k])
            x = g.concat(g.relu(g.conv(a, k)), b) if draw(st.booleans()) else g.concat(b, g.relu(a))
        elif block == "se":
            x = g.se(x, r=draw(st.sampled_from([1, 2, 4])))
        elif block == "pool" and hw >= 2:
            op = draw(st.sampled_from(["MaxPool", "AveragePool"]))
            x = g.op(op, [x], kernel_shape=[2, 2], strides=[2, 2])
            hw //= 2
        elif block == "act":
            x = act(g, x, draw(st.sampled_from(ACTS)))
        elif block == "slice" and c >= 3:
            lo = draw(st.integers(0, c - 2))
            hi = draw(st.integers(lo + 1, c))
            x = g.op(
                "Slice",
                [
                    x,
                    g.const(np.array([lo], np.int64)),
                    g.const(np.array([hi], np.int64)),
                    g.const(np.array([1], np.int64)),
                ],
                channels=hi - lo,
            )
        elif block == "resize" and hw <= 8:
            x = g.op("Resize", [x, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
            hw *= 2
        elif block == "grouped" and c % 2 == 0:
            x = g.relu(g.conv(x, c, group=2))
        elif block == "fc_mid" and draw(st.booleans()):
            outputs.append(g.head(x, classes=draw(st.integers(1, 4))))  # an extra head mid-network
    flat = draw(st.booleans()) and hw <= 4
    outputs.append(g.head(x, classes=draw(st.integers(2, 6)), flatten_spatial=flat))
    return g.model(outputs)


def act(g: G, x: str, op: str) -> str:
    if op == "PRelu":
        return g.prelu(x)
    if op == "SiLU":
        return g.silu(x)
    if op == "Clip":
        return g.op("Clip", [x, g.const(np.float32(0)), g.const(np.float32(6))])
    if op == "LeakyRelu":
        return g.op(op, [x], alpha=0.1)
    return g.op(op, [x])
