"""Per-channel and elementwise ops: normalisations, activations, pools, Resize, and binary ops between channel tensors
and with constants (handlers/pointwise.py). Each test checks the analysis (what is coupled, what is frozen and why)
and then prunes with random plans: the pruned model must equal the original with the removed channels' consumer
weights zeroed."""

from __future__ import annotations

import numpy as np
import pytest
from channel_checks import group_of, node_of, prune_randomly
from graphs import G, analyse_proto

# -- per-channel ops --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["BatchNormalization", "InstanceNormalization"])
def test_normalisations_slice_their_parameters(norm):
    g = G()
    a = g.conv("x", 8)
    if norm == "BatchNormalization":
        b = g.bn(a)
    else:
        b = g.op(norm, [a, g.weight(8), g.weight(8)])
    y = g.conv(g.relu(b), 4)
    model, an = analyse_proto(g.model([y]))
    pruned = prune_randomly(model, an)
    n = pruned.nodes[node_of(g, b)]
    assert pruned.array(n.input[1]).shape[0] < 8


UNARY = [
    ("Relu", {}),
    ("LeakyRelu", {"alpha": 0.1}),
    ("Sigmoid", {}),
    ("HardSigmoid", {}),
    ("HardSwish", {}),
    ("Tanh", {}),
    ("Dropout", {}),
    ("Identity", {}),
    ("Elu", {}),
]


@pytest.mark.parametrize("op,attrs", UNARY, ids=[u[0] for u in UNARY])
def test_unary_ops_pass_channels_through(op, attrs):
    g = G()
    a = g.conv("x", 8)
    b = g.op(op, [a], **attrs)
    y = g.conv(b, 4)
    model, an = analyse_proto(g.model([y]))
    assert np.array_equal(an.units_of_tensor(a), an.units_of_tensor(b))
    prune_randomly(model, an)


def around_a_conv(act):
    """x -> Conv(8) -> act(g, a) -> Conv(4), analysed: (g, model, analysis, a, act's output)."""
    g = G()
    a = g.conv("x", 8)
    b = act(g, a)
    model, an = analyse_proto(g.model([g.conv(b, 4)]))
    return g, model, an, a, b


def test_clip_relu6_with_constant_limits():
    _, model, an, a, b = around_a_conv(lambda g, a: g.op("Clip", [a, g.const(np.float32(0)), g.const(np.float32(6))]))
    assert np.array_equal(an.units_of_tensor(a), an.units_of_tensor(b))
    prune_randomly(model, an)


def test_silu_mul_of_sigmoid_is_elementwise_on_the_same_channels():
    _, model, an, a, s = around_a_conv(lambda g, a: g.silu(a))
    assert np.array_equal(an.units_of_tensor(a), an.units_of_tensor(s))
    assert not an.unit_frozen[an.units_of_tensor(a)].any()
    prune_randomly(model, an)


def test_prelu_per_channel_slope_is_sliced():
    g, model, an, a, p = around_a_conv(lambda g, a: g.prelu(a))
    pruned = prune_randomly(model, an)
    assert pruned.array(pruned.nodes[node_of(g, p)].input[1]).shape[0] < 8


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
def test_pools(op):
    g = G()
    a = g.relu(g.conv("x", 8))
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2]} if op in ("MaxPool", "AveragePool") else {}
    b = g.op(op, [a], **attrs)
    model, an = analyse_proto(g.model([g.conv(b, 4)]))
    assert np.array_equal(an.units_of_tensor(a), an.units_of_tensor(b))
    prune_randomly(model, an)


def test_resize_with_scales_and_with_sizes():
    g = G()
    a = g.relu(g.conv("x", 8))
    up = g.op("Resize", [a, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    sizes = g.const(np.array([1, 8, 32, 32], np.int64))
    up2 = g.op("Resize", [up, "", "", sizes], mode="nearest")
    model, an = analyse_proto(g.model([g.conv(up2, 4)]))
    pruned = prune_randomly(model, an)
    n = pruned.nodes[node_of(g, up2)]
    assert pruned.array(n.input[3])[1] < 8  # the channel entry of `sizes` follows the pruning


# -- between tensors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min"])
def test_binary_between_channel_tensors_unions_index_by_index(op):
    g = G()
    a = g.conv("x", 8)
    b = g.conv("x", 8)
    if op == "Div":
        b = g.op("Sigmoid", [b])  # keep the divisor away from 0
    c = g.op(op, [a, b])
    model, an = analyse_proto(g.model([g.conv(g.relu(c), 4)]))
    assert np.array_equal(an.units_of_tensor(a), an.units_of_tensor(c))
    assert np.array_equal(an.units_of_tensor(b), an.units_of_tensor(c))
    assert group_of(an, g.nodes[0].name) == group_of(an, g.nodes[1].name)
    prune_randomly(model, an)


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (8, 1, 1), (1, 1, 1, 1)])
def test_binary_with_per_channel_constant_slices_the_constant(shape):
    g = G()
    a = g.conv("x", 8)
    k = g.const(g.rng.uniform(0.5, 2, shape).astype(np.float32))
    c = g.op("Mul", [a, k])
    model, an = analyse_proto(g.model([g.conv(c, 4)]))
    pruned = prune_randomly(model, an)
    if shape[-3] == 8:
        assert pruned.array(k).shape[-3] < 8
    else:
        assert pruned.array(k).shape == shape


def test_residual_block_couples_stream():
    g = G()
    s = g.relu(g.bn(g.conv("x", 8)))
    r = g.bn(g.conv(g.relu(g.bn(g.conv(s, 8))), 8))
    out = g.relu(g.add(s, r))
    model, an = analyse_proto(g.model([g.head(out)]))
    convs = [n.name for n in g.nodes if n.op_type == "Conv"]
    assert group_of(an, convs[0]) == group_of(an, convs[2])  # stem and the block's last conv share the stream
    assert group_of(an, convs[1]) != group_of(an, convs[0])
    prune_randomly(model, an)
