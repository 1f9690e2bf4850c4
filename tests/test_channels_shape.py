"""Into fully connected layers: Flatten, Reshape, Transpose to channels-last, squeeze-excitation (handlers/shape.py).
Each test checks the analysis (what is coupled, what is frozen and why) and then prunes with random plans: the
pruned model must equal the original with the removed channels' consumer weights zeroed."""

from __future__ import annotations

import numpy as np
import pytest
from channel_checks import assert_frozen, group_of, prune_randomly
from graphs import G, analyse_proto

# -- into fully connected layers -------------------------------------------------------------------------------------


def test_flatten_to_gemm_owns_hw_columns_per_channel():
    g = G()
    a = g.relu(g.conv("x", 6, stride=2))  # 6 x 4 x 4
    y = g.head(a, flatten_spatial=True)
    model, an = analyse_proto(g.model([y]))
    flat = next(o for n in g.nodes if n.op_type == "Flatten" for o in n.output)
    assert len(an.tensors[flat]) == 6 * 16
    pruned = prune_randomly(model, an)
    gemm = next(n for n in pruned.graph.node if n.op_type == "Gemm")
    assert pruned.array(gemm.input[1]).shape[1] % 16 == 0 and pruned.array(gemm.input[1]).shape[1] < 96


@pytest.mark.parametrize("target", [[-1, 96], [0, -1], [1, 96]])
def test_reshape_to_n_chw_then_gemm(target):
    g = G(dynamic_batch=target[0] != 1)
    a = g.relu(g.conv("x", 6, stride=2))
    r = g.op("Reshape", [a, g.const(np.array(target, np.int64))])
    y = g.op("Gemm", [r, g.weight(3, 96), g.const(np.zeros(3, np.float32))], channels=3, transB=1)
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[an.units_of_tensor(a)].any()
    prune_randomly(model, an)


def test_channel_shuffle_reshape_is_frozen():
    g = G(dynamic_batch=False)
    a = g.relu(g.conv("x", 8))
    r = g.op("Reshape", [a, g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    t = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
    b = g.op("Reshape", [t, g.const(np.array([1, 8, 8, 8], np.int64))])
    assert_frozen(g, [g.conv(b, 4)], a, "reorders the axes the channel axis was split into", prune=False)


def test_transpose_to_channels_last_is_followed():
    g = G()
    a = g.relu(g.conv("x", 8))
    t = g.op("Transpose", [a], perm=[0, 2, 3, 1])  # N H W C
    h = g.relu(g.op("MatMul", [t, g.weight(8, 12)], channels=12))
    m2 = g.op("MatMul", [h, g.weight(12, 8)], channels=8)
    back = g.op("Transpose", [m2], perm=[0, 3, 1, 2])
    model, an = analyse_proto(g.model([g.conv(back, 4)]))
    assert not an.unit_frozen[an.units_of_tensor(a)].any()
    assert not an.unit_frozen[an.units_of_tensor(h)].any()
    prune_randomly(model, an)


def test_se_block():
    g = G()
    a = g.relu(g.conv("x", 8))
    s = g.se(a, r=2)
    model, an = analyse_proto(g.model([g.conv(s, 4)]))
    convs = [n.name for n in g.nodes if n.op_type == "Conv"]
    assert group_of(an, convs[0]) == group_of(an, convs[2])  # excitation output gates the block's channels
    assert group_of(an, convs[1]) != group_of(an, convs[0])  # squeeze width is its own group
    prune_randomly(model, an)
