"""What freezes channels, and why: graph inputs and outputs, shared or non-constant weights, unknown ops, reductions
over channels, control flow; plus plans that remove nothing and dynamic-batch views. Each test checks the analysis
(what is coupled, what is frozen and why) and then prunes with random plans: the pruned model must equal the
original with the removed channels' consumer weights zeroed."""

from __future__ import annotations

import numpy as np
import pytest
from channel_checks import assert_frozen, prune_randomly, reasons
from graphs import G, analyse_proto, assert_exact, if_model, manual_plan

from carve.pipeline.errors import UnsupportedModelError

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
