"""One test per op handler of the channel analysis, each on a tiny hand-built graph.

Every test checks the analysis (what is coupled, what is frozen and why) and then prunes with random plans: the pruned
model must equal the original with the removed channels' consumer weights zeroed.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G, analyse_proto, assert_exact, if_model, manual_plan, random_removal

from carve.pipeline.errors import UnsupportedModelError
from carve.pipeline.graph.channels import Kind


def prune_randomly(model, analysis, seeds=(0, 1, 2), p=0.5):
    out = None
    for s in seeds:
        removed = random_removal(analysis, np.random.default_rng(s), p)
        out = assert_exact(model, manual_plan(analysis, removed))
    return out


def assert_frozen(g: G, outputs: list[str], tensor: str, reason: str, *, prune: bool = True):
    """Analyse ``g``: ``tensor``'s channels are all frozen, for a reason that contains ``reason``; the rest still
    prunes exactly (when ``prune``)."""
    model, an = analyse_proto(g.model(outputs))
    assert reason in reasons(an)
    assert an.unit_frozen[an.units_of_tensor(tensor)].all()
    if prune:
        prune_randomly(model, an)
    return model, an


def group_of(analysis, node: str) -> int:
    src = next(s for s in analysis.sources if s.name == node and s.kind in (Kind.OUT, Kind.MEMBER))
    groups = {int(analysis.unit_group[u]) for u in analysis.source_units(src)}
    assert len(groups) == 1
    return groups.pop()


def node_of(g: G, out: str) -> str:
    return next(n.name for n in g.nodes if out in n.output)


def reasons(analysis) -> str:
    return " | ".join(r for rs in analysis.unit_reasons.values() for r in rs)


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


def test_concat_on_channel_axis_keeps_groups_apart():
    g = G()
    a = g.relu(g.conv("x", 4))
    b = g.relu(g.conv("x", 6))
    c = g.concat(a, b)
    model, an = analyse_proto(g.model([g.conv(c, 4)]))
    assert group_of(an, g.nodes[0].name) != group_of(an, g.nodes[2].name)
    assert len(an.tensors[c]) == 10
    prune_randomly(model, an)


def test_concat_with_constant_channels():
    g = G(dynamic_batch=False)  # the constant has batch 1
    a = g.relu(g.conv("x", 4))
    k = g.const(np.ones((1, 2, 8, 8), np.float32))
    g.channels[k] = 2
    c = g.concat(a, k)
    model, an = analyse_proto(g.model([g.conv(c, 4)]))
    assert any(s.kind == Kind.CONST for s in an.sources)
    pruned = prune_randomly(model, an, p=0.7)
    assert pruned.array(k).shape[1] <= 2


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_on_channel_axis_fixes_sizes(opset):
    g = G(opset=opset)
    a = g.relu(g.conv("x", 10))
    if opset == 11:
        outs = g.op("Split", [a], outputs=2, axis=1, split=[4, 6])
        g.channels[outs[0]], g.channels[outs[1]] = 4, 6
    elif opset == 18:
        outs = g.op("Split", [a], outputs=2, axis=1, num_outputs=2)
        g.channels[outs[0]] = g.channels[outs[1]] = 5
    else:
        outs = g.split(a, [4, 6])
    y = g.concat(g.conv(outs[0], 3), g.relu(outs[1]))
    model, an = analyse_proto(g.model([g.conv(y, 2)]))
    assert not an.unit_frozen[an.units_of_tensor(a)].any()
    prune_randomly(model, an)


def test_slice_on_channel_axis():
    g = G()
    a = g.relu(g.conv("x", 10))
    s = g.op(
        "Slice",
        [a, g.const(np.array([2], np.int64)), g.const(np.array([7], np.int64)), g.const(np.array([1], np.int64))],
        channels=5,
    )
    y = g.add(g.conv(a, 5), s)
    model, an = analyse_proto(g.model([g.conv(y, 2)]))
    assert np.array_equal(an.units_of_tensor(s), an.units_of_tensor(a)[2:7])
    prune_randomly(model, an)


def test_strided_slice_on_channel_axis_is_frozen():
    g = G()
    a = g.relu(g.conv("x", 10))
    s = g.op(
        "Slice",
        [
            a,
            g.const(np.array([0], np.int64)),
            g.const(np.array([10], np.int64)),
            g.const(np.array([1], np.int64)),
            g.const(np.array([2], np.int64)),
        ],
        channels=5,
    )
    model, an = analyse_proto(g.model([g.conv(s, 2)]))
    assert "every 2th channel" in reasons(an)


def test_pad_on_channel_axis_option_a_shortcut():
    g = G()
    s = g.relu(g.conv("x", 4))
    sub = g.subsample(s)
    sc = g.pad_channels(sub, 2, 2)
    r = g.conv(g.relu(g.conv(s, 8, stride=2)), 8)
    out = g.relu(g.add(r, sc))
    model, an = analyse_proto(g.model([g.head(out)]))
    assert any(s.kind == Kind.PAD for s in an.sources)
    # stream of 8 = 2 zero channels + the 4 stage-1 channels + 2 zero channels, all one group
    assert group_of(an, g.nodes[0].name) == group_of(an, [n.name for n in g.nodes if n.op_type == "Conv"][2])
    for seed in range(6):
        removed = random_removal(an, np.random.default_rng(seed), 0.5)
        pruned = assert_exact(model, manual_plan(an, removed))
        pad = next(n for n in pruned.graph.node if n.op_type == "Pad")
        pads = pruned.array(pad.input[1])
        assert pads[1] + pads[5] + pruned.shape(s)[1] == pruned.shape(r)[1]


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


# -- what freezes -----------------------------------------------------------------------------------------------------


def test_graph_input_and_output_are_frozen():
    g = G()
    y = g.conv(g.relu(g.conv("x", 8)), 4)
    model, an = analyse_proto(g.model([y]))
    assert an.unit_frozen[an.units_of_tensor("x")].all()
    assert an.unit_frozen[an.units_of_tensor(y)].all()
    assert "graph input 'x'" in reasons(an) and "reaches graph output" in reasons(an)


def test_shared_weight_freezes_its_channels():
    g = G()
    w = g.weight(8, 3, 3, 3)
    a = g.op("Conv", ["x", w], channels=8, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = g.op("Conv", ["x", w], channels=8, kernel_shape=[3, 3], pads=[1, 1, 1, 1], dilations=[1, 1])
    y = g.conv(g.concat(g.relu(a), g.relu(b)), 4)
    assert_frozen(g, [y], a, "shared by nodes")


def test_non_constant_weight_freezes():
    from onnx import TensorProto, helper

    g = G()
    a = g.relu(g.conv("x", 8))
    g.inputs.append(helper.make_tensor_value_info("wfeed", TensorProto.FLOAT, [4, 8, 1, 1]))
    w = g.op("Relu", ["wfeed"])  # a weight computed at run time
    y = g.op("Conv", [a, w], channels=4, kernel_shape=[1, 1])
    assert_frozen(g, [y], a, "is not a constant", prune=False)


def test_unknown_op_freezes_what_it_touches():
    g = G()
    a = g.relu(g.conv("x", 8))
    b = g.op("LpNormalization", [a], axis=1)
    assert_frozen(g, [g.conv(b, 4)], a, "does not know", prune=False)


def test_softmax_over_channels_freezes():
    g = G()
    a = g.conv("x", 8)
    b = g.op("Softmax", [a], axis=1)
    model, an = analyse_proto(g.model([g.conv(b, 4)]))
    assert "normalises across channels" in reasons(an)


def test_reduce_over_channels_freezes_but_spatial_reduce_passes():
    g = G()
    a = g.relu(g.conv("x", 8))
    m = g.op("ReduceMean", [a], axes=[1], keepdims=1)  # spatial attention map
    gated = g.op("Mul", [a, g.op("Sigmoid", [m])])
    sp = g.op("ReduceMean", [gated], axes=[2, 3], keepdims=1)
    model, an = analyse_proto(g.model([g.conv(sp, 4)]))
    assert "reduces over the channels" in reasons(an)
    assert np.array_equal(an.units_of_tensor(gated), an.units_of_tensor(sp))


def test_control_flow_on_channel_path_is_refused():
    with pytest.raises(UnsupportedModelError, match="If 'branch' is control flow"):
        analyse_proto(if_model(condition_from_data=True))


def test_if_with_a_constant_condition_is_flattened_and_analysed():
    model, an = analyse_proto(if_model(condition_from_data=False))
    assert not any(n.op_type == "If" for n in model.graph.node)  # the then-branch was inlined
    assert an.summary()["prunable_channels"] == 0  # the conv's channels reach the output


def test_ratio_zero_plan_removes_nothing():
    g = G()
    y = g.conv(g.relu(g.conv("x", 8)), 4)
    model, an = analyse_proto(g.model([y]))
    plan = manual_plan(an, np.zeros(an.n_units, bool))
    pruned = assert_exact(model, plan)
    assert pruned.array(g.nodes[0].input[1]).shape[0] == 8


def test_view_with_dynamic_batch_then_linear(tmp_path):
    """`x.view(x.size(0), -1)` exports a computed shape; the channels must still be followed into the Linear."""
    import torch
    from conftest import export_torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    path = export_torch(Net().eval(), tmp_path / "view.onnx", shape=(1, 3, 8, 8))
    from carve.pipeline.graph import load

    model = load(path)
    assert any(n.op_type == "Reshape" for n in model.graph.node)
    an = __import__("carve").analyse(model)
    conv_out = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    assert not an.unit_frozen[an.units_of_tensor(conv_out)].any()
    prune_randomly(model, an)
