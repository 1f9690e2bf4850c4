"""Producers: Conv (plain, depthwise, grouped), ConvTranspose, Gemm and MatMul (handlers/producers.py). Each test
checks the analysis (what is coupled, what is frozen and why) and then prunes with random plans: the pruned model
must equal the original with the removed channels' consumer weights zeroed."""

from __future__ import annotations

import numpy as np
import pytest
from channel_checks import assert_frozen, group_of, node_of, prune_randomly
from graphs import G, analyse_proto

from carve.pipeline.graph.channels import Kind

# -- producers ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_conv_chain(bias):
    g = G()
    a = g.relu(g.conv("x", 8, bias=bias))
    y = g.conv(a, 4, bias=bias)
    model, an = analyse_proto(g.model([y]))
    c1 = g.nodes[0].name
    assert not an.unit_frozen[an.source_units(next(s for s in an.sources if s.name == c1))].any()
    pruned = prune_randomly(model, an)
    w = pruned.array(g.nodes[0].input[1])
    assert w.shape[0] < 8 and w.shape[1:] == (3, 3, 3)  # rows cut, input (graph input) untouched


def test_depthwise_couples_input_and_output():
    g = G()
    a = g.relu(g.conv("x", 8))
    d = g.dw(a)
    y = g.conv(g.relu(d), 4)
    model, an = analyse_proto(g.model([y]))
    dw_node = node_of(g, d)
    assert group_of(an, dw_node) == group_of(an, g.nodes[0].name)  # dw channels are the producer's channels
    assert any(s.kind == Kind.MEMBER and s.name == dw_node for s in an.sources)
    pruned = prune_randomly(model, an)
    node = pruned.nodes[dw_node]
    group = next(at.i for at in node.attribute if at.name == "group")
    assert group == pruned.array(node.input[1]).shape[0] < 8


def test_depthwise_with_channel_multiplier():
    g = G()
    a = g.relu(g.conv("x", 6))
    d = g.dw(a, mult=2)  # 6 -> 12 channels, output o reads input o // 2
    y = g.conv(g.relu(d), 4)
    model, an = analyse_proto(g.model([y]))
    assert an.n_units < 30
    prune_randomly(model, an)


def test_one_output_channel_conv_is_not_depthwise():
    g = G((1, 1, 8, 8))
    a = g.conv("x", 1, group=1)  # 1 in, 1 out, group 1: a plain conv
    y = g.conv(g.relu(g.conv(a, 4)), 2)
    model, an = analyse_proto(g.model([y]))
    src = next(s for s in an.sources if s.name == g.nodes[0].name)
    assert src.kind == Kind.OUT


def test_grouped_conv_transpose_is_frozen_with_reason():
    # grouped Conv is prunable (tests/test_grouped.py); grouped ConvTranspose is refused by name
    g = G()
    a = g.relu(g.conv("x", 8))
    b = g.op("ConvTranspose", [a, g.weight(8, 4, 2, 2)], channels=8, group=2, kernel_shape=[2, 2], strides=[2, 2])
    y = g.conv(g.relu(b), 4)
    assert_frozen(g, [y], a, "grouped ConvTranspose")


def test_conv_transpose():
    g = G()
    a = g.relu(g.conv("x", 8))
    w = g.weight(8, 6, 2, 2)
    up = g.op(
        "ConvTranspose", [a, w, g.const(np.zeros(6, np.float32))], channels=6, kernel_shape=[2, 2], strides=[2, 2]
    )
    y = g.conv(g.relu(up), 4)
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[an.units_of_tensor(up)].any()
    pruned = prune_randomly(model, an)
    assert pruned.array(w).shape[1] < 6


def test_gemm_mlp_hidden_layer_is_prunable():
    g = G((1, 12), dynamic_batch=True)
    h = g.op("Gemm", ["x", g.weight(16, 12), g.const(np.zeros(16, np.float32))], channels=16, transB=1)
    h = g.relu(h)
    y = g.op("Gemm", [h, g.weight(16, 5), g.const(np.zeros(5, np.float32))], channels=5)  # transB=0
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[an.units_of_tensor(h)].any()
    assert an.unit_frozen[an.units_of_tensor(y)].all()
    prune_randomly(model, an)


def test_matmul_producer_and_consumer():
    g = G((1, 12))
    h = g.relu(g.op("MatMul", ["x", g.weight(12, 10)], channels=10))
    y = g.op("MatMul", [h, g.weight(10, 3)], channels=3)
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[an.units_of_tensor(h)].any()
    prune_randomly(model, an)
