"""Ops that rearrange the channel axis: Concat, Split, Slice, Pad (handlers/structure.py). Each test checks the
analysis (what is coupled, what is frozen and why) and then prunes with random plans: the pruned model must equal
the original with the removed channels' consumer weights zeroed."""

from __future__ import annotations

import numpy as np
import pytest
from channel_checks import group_of, prune_randomly, reasons
from graphs import G, analyse_proto, assert_exact, manual_plan, random_removal

from carve.pipeline.graph.channels import Kind


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
