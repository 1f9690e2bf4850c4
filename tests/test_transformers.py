"""Transformers in the channel analysis: residual streams under LayerNorm (inexact, reported), attention heads (whole
heads, or per-head widths), and layouts (head splits, window partitions, channels-last blocks, patch flatten).

Each test builds the pattern as exporters write it (:mod:`tgraphs`), checks what the analysis says, and prunes with
random plans in both attention modes: the pruned model must equal the masked reference
(:func:`carve.pipeline.graph.surgery.reference`) in ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import analyse_proto, assert_exact, manual_plan, random_removal
from onnx import TensorProto, helper
from tgraphs import TG

from carve.pipeline import graph as cgraph
from carve.pipeline.graph.channels import Kind, analyse
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.surgery import prune, reference
from carve.pipeline.pruning.planner import plan
from carve.pipeline.pruning.prune import PruneOptions, prune_model
from carve.pipeline.runtime import ort as ortutil


def prune_randomly(proto, modes=("heads", "width"), seeds=(0, 1, 2), p=0.5):
    """Random plans in each attention mode: every one exact against the masked reference."""
    model = cgraph.from_proto(proto)
    out = {}
    for mode in modes:
        an = analyse(model, attention=mode)
        for s in seeds:
            removed = random_removal(an, np.random.default_rng(s), p)
            out[mode] = (an, assert_exact(model, manual_plan(an, removed)))
    return model, out


def reasons(an) -> str:
    return " | ".join(r for rs in an.unit_reasons.values() for r in rs)


def units_of(an, tensor: str) -> np.ndarray:
    c = an.tensors.get(tensor) or an.blocks.get(tensor)
    return np.unique(an.unit_of[c.ids])


def source(an, node: str):
    return next(s for s in an.sources if s.name == node and s.kind == Kind.OUT)


def node_of(g: TG, out: str) -> str:
    return next(n.name for n in g.nodes if out in n.output)


def outputs_equal(a, b, feeds, atol=1e-5):
    for x, y in zip(ortutil.run(a, feeds), ortutil.run(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=0, atol=atol * max(1.0, float(np.abs(x).max())))


# -- residual streams under LayerNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fused", "decomposed", "rms"])
def test_layer_norm_stream_is_prunable_and_inexact(kind):
    g = TG(channels=6)
    e = g.linear("x", 8)
    x = g.op("Add", [e, g.linear(g.gelu(g.linear(g.layer_norm(e, kind), 12)), 8)])
    y = g.head(g.layer_norm(x, kind))
    model, an = analyse_proto(g.model([y]))
    stream = units_of(an, e)
    assert not an.unit_frozen[stream].any()
    gid = int(an.unit_group[stream[0]])
    assert an.groups[gid].inexact and "not an exact removal" in an.groups[gid].inexact[0]
    assert all(an.inexact_reasons(u) for u in stream)
    prune_randomly(g.model([y]), modes=("heads",))


def test_inexact_removal_differs_from_plain_reference_and_only_then():
    g = TG(channels=6)
    e = g.linear("x", 8)
    h = g.linear(g.gelu(g.linear(g.layer_norm(e), 12)), 8)
    y = g.head(g.layer_norm(g.op("Add", [e, h])))
    model, an = analyse_proto(g.model([y]))
    feeds = ortutil.random_feeds(model, batch=2, seed=0)
    stream, hidden = units_of(an, e), [u for u in range(an.n_units) if not an.unit_frozen[u]]
    hidden = [u for u in hidden if u not in set(stream)]
    exact = np.zeros(an.n_units, bool)
    exact[hidden[:3]] = True  # MLP hidden channels only: exact
    p = manual_plan(an, exact)
    outputs_equal(reference(model, p), reference(model, p, statistics="all"), feeds, atol=1e-6)
    inexact = np.zeros(an.n_units, bool)
    inexact[stream[:2]] = True
    p = manual_plan(an, inexact)
    pruned = assert_exact(model, p)
    a = ortutil.run(reference(model, p, statistics="all"), feeds)[0]
    b = ortutil.run(pruned, feeds)[0]
    assert np.abs(a - b).max() > 1e-4  # the statistics changed: not the plain reference


def test_layer_norm_over_other_axes_passes_channels_exactly():
    """LayerNorm over the tokens of a [N, C, T] tensor leaves the channels (axis 1) alone: exact, not inexact."""
    g = TG(channels=6)
    e = g.transpose(g.linear("x", 8), [0, 2, 1])  # [N, 8, T]
    n = g.op("LayerNormalization", [e, g.const(np.ones(6, np.float32)), g.const(np.zeros(6, np.float32))], axis=-1)
    y = g.head(g.linear(g.transpose(n, [0, 2, 1]), 5))
    model, an = analyse_proto(g.model([y]))
    u = units_of(an, e)
    assert not an.unit_frozen[u].any()
    assert not any(an.inexact_reasons(x) for x in u)
    prune_randomly(g.model([y]), modes=("heads",))


def test_layer_norm_stats_outputs_freeze_with_reason():
    g = TG(channels=6)
    e = g.linear("x", 8)
    ln = g.op(
        "LayerNormalization", [e, g.const(np.ones(8, np.float32)), g.const(np.zeros(8, np.float32))], outputs=3, axis=-1
    )
    y = g.op("Add", [g.head(g.linear(ln[0], 5)), g.op("ReduceSum", [ln[1]], keepdims=0, shape=[None])])
    model, an = analyse_proto(g.model([y]))
    assert an.unit_frozen[units_of(an, e)].all()
    assert "also outputs its statistics" in reasons(an)


def test_prune_model_reports_the_inexact_error():
    g = TG(channels=6)
    x = g.linear("x", 16)
    x = g.block(x, 2, 4)
    y = g.head(g.layer_norm(x))
    model = cgraph.from_proto(g.model([y]))
    report = prune_model(model, PruneOptions(ratio=0.5, round_to=1))
    assert report.verify.reference == "masked statistics"
    ix = report.inexact
    assert ix.units > 0 and ix.groups == 1 and "LayerNormalization" in ix.reason
    assert 0 < ix.error["max_rel"] < 10 and 0 < ix.error["cosine"] <= 1
    assert report.to_json()["inexact"]["error"] == ix.error  # the summary and the model's history say it too
    # without a LayerNorm over channels the same prune is exact: plain reference, nothing inexact
    g = TG(channels=6)
    y = g.head(g.mlp(g.linear("x", 16), 32))
    report = prune_model(cgraph.from_proto(g.model([y])), PruneOptions(ratio=0.5, round_to=1))
    assert report.verify.reference == "zeroed" and report.inexact is None


# -- attention heads --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused,gather", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dynamic", [True, False])
def test_attention_heads_are_units(fused, gather, dynamic):
    g = TG(channels=8, dynamic_batch=dynamic)
    x = g.linear("x", 12)
    y = g.head(g.op("Add", [x, g.attention(x, 3, 4, fused=fused, gather=gather)]))
    model, an = analyse_proto(g.model([y]))
    proj = next(
        n
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[0] in model.producer and model.producer[n.input[0]].op_type == "Reshape"
    )
    proj_in = next(r for r in an.slice_records if r.role == "in" and r.node == proj.name)
    heads = np.unique(an.unit_of[proj_in.ids])
    assert len(heads) == 3  # one unit per head: its Q, K and V channels and the projection rows it feeds
    for h in heads:
        assert (an.unit_of == h).sum() >= 3 * 4  # Q, K, V channels of the head
        assert not an.unit_frozen[h]
    gid = int(an.unit_group[heads[0]])
    k = next(i for i, sl in enumerate(an.groups[gid].slices) if heads[0] in sl)
    assert an.groups[gid].spans[k] == 4 and an.groups[gid].round_to(k, 8) == 2
    _, out = prune_randomly(g.model([y]))
    assert "width" in out and "heads" in out


def test_head_removal_changes_reshape_targets():
    g = TG(channels=8, dynamic_batch=False)
    x = g.linear("x", 12)
    y = g.head(g.op("Add", [x, g.attention(x, 3, 4)]))
    model, an = analyse_proto(g.model([y]))
    removed = np.zeros(an.n_units, bool)
    heads = [u for u in np.unique(an.unit_of) if (an.unit_of == u).sum() >= 12 and not an.unit_frozen[u]]
    assert len(heads) == 3
    removed[heads[0]] = True
    pruned = assert_exact(model, manual_plan(an, removed))
    targets = [pruned.array(n.input[1]).tolist() for n in pruned.graph.node if n.op_type == "Reshape"]
    assert [1, 6, 3, 2, 4] in targets and [1, 6, 8] in targets  # 3 -> 2 heads; 12 -> 8 channels


def test_zero_output_projection_head_removal_changes_nothing():
    """Removing a head whose output-projection rows are zero leaves the function unchanged (against the original,
    not a reference)."""
    g = TG(channels=8)
    x = g.linear("x", 12)
    y = g.head(g.op("Add", [x, g.attention(x, 3, 4)]))
    model, an = analyse_proto(g.model([y]))
    proj = [n for n in model.graph.node if n.op_type == "MatMul" and model.is_const(n.input[1])][2]
    w = model.array(proj.input[1]).copy()
    w[4:8] = 0  # head 1 feeds rows 4..7
    model.set_array(proj.input[1], w)
    an = analyse(model)
    rec = next(r for r in an.slice_records if r.node == proj.name and r.role == "in")
    removed = np.zeros(an.n_units, bool)
    removed[np.unique(an.unit_of[rec.ids[4:8]])] = True
    assert removed.sum() == 1
    pruned = prune(model, Plan(an, removed))
    outputs_equal(model, pruned, ortutil.random_feeds(model, batch=2, seed=1), atol=1e-6)


def test_width_mode_prunes_equal_widths_per_head():
    g = TG(channels=8, dynamic_batch=False)
    x = g.linear("x", 12)
    y = g.head(g.op("Add", [x, g.attention(x, 3, 4, fused=False, v_dim=2)]))
    model, an = analyse_proto(g.model([y]))
    an = analyse(model, attention="width")
    lock = [m for gr in an.groups for m in gr.lockstep]
    assert lock and all(len(m) == 3 for m in lock)  # the three heads of Q/K, of V
    p = plan(an, 0.5)
    pruned = assert_exact(model, p)
    targets = [
        pruned.array(n.input[1]).tolist()
        for n in pruned.graph.node
        if n.op_type == "Reshape" and pruned.is_const(n.input[1])
    ]
    dims = {tuple(t[-2:]) for t in targets if len(t) == 4}
    assert (3, 2) in dims and (3, 1) in dims  # Q/K 4 -> 2 per head, V 2 -> 1 per head; heads stay


def test_fused_qkv_width_mode_keeps_qk_and_v_widths_equal():
    g = TG(channels=8, dynamic_batch=False)
    x = g.linear("x", 12)
    y = g.head(g.op("Add", [x, g.attention(x, 3, 4)]))
    model, an = analyse_proto(g.model([y]))
    an = analyse(model, attention="width")
    for s in range(4):
        removed = random_removal(an, np.random.default_rng(s), 0.6)
        pruned = assert_exact(model, manual_plan(an, removed))
        r = next(n for n in pruned.graph.node if n.op_type == "Reshape")
        t = pruned.array(r.input[1]).tolist()
        assert t[2:4] == [3, 3] and 1 <= t[4] <= 4


def test_swin_windows_and_relative_position_bias():
    g = TG(tokens=16, channels=8)
    x = g.linear("x", 8)
    w, reverse = g.windows(g.layer_norm(x), 4, 4, 2)
    a = reverse(g.attention(w, 2, 4, bias_heads=True))
    y = g.head(g.op("Add", [x, a]))
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[units_of(an, x)].any()
    rpb = next(r for r in an.slice_records if r.tensor.startswith("rpb"))
    assert rpb.axis == 1  # the per-head bias is cut along its head axis
    prune_randomly(g.model([y]))


def test_channels_last_block_under_layer_norm():
    """ConvNeXt: depthwise conv, permute to channels-last, LayerNorm, MLP as MatMuls, permute back, residual."""
    g = TG(image=(4, 6, 6), dynamic_batch=True)
    stem = g.op(
        "Conv",
        ["x", g.weight(8, 4, 1, 1), g.const(np.zeros(8, np.float32))],
        kernel_shape=[1, 1],
        shape=[g.shape["x"][0], 8, 6, 6],
    )
    dw = g.op(
        "Conv",
        [stem, g.weight(8, 1, 3, 3), g.const(np.zeros(8, np.float32))],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        group=8,
    )
    t = g.transpose(dw, [0, 2, 3, 1])
    m = g.linear(g.gelu(g.linear(g.layer_norm(t), 16)), 8)
    y = g.op("Add", [stem, g.transpose(m, [0, 3, 1, 2])])
    out = g.op("GlobalAveragePool", [y], shape=[g.shape["x"][0], 8, 1, 1])
    model, an = analyse_proto(g.model([out]))
    u = units_of(an, stem)
    assert an.unit_frozen[u].all()  # it reaches the output through the pool: frozen by the output, not by the norm
    y2 = g.op("Conv", [y, g.weight(5, 8, 1, 1)], kernel_shape=[1, 1], shape=[g.shape["x"][0], 5, 6, 6])
    model, an = analyse_proto(g.model([y2]))
    u = units_of(an, stem)
    assert not an.unit_frozen[u].any() and all(an.inexact_reasons(x) for x in u)
    prune_randomly(g.model([y2]), modes=("heads",))


def test_patch_flatten_class_token_and_position_embedding():
    """ViT's stem: conv patches, Reshape [N, C, -1] with N and C read at run time, Transpose, a class token
    broadcast by Expand and concatenated on the token axis, a position embedding added."""
    g = TG(image=(3, 8, 8))
    n = g.shape["x"][0]
    p = g.op(
        "Conv",
        ["x", g.weight(6, 3, 4, 4), g.const(np.zeros(6, np.float32))],
        kernel_shape=[4, 4],
        strides=[4, 4],
        shape=[n, 6, 2, 2],
    )
    nc = g.op("Slice", [g.op("Shape", [p], shape=[4]), g.ints([0]), g.ints([2]), g.ints([0])], shape=[2])
    r = g.op("Reshape", [p, g.op("Concat", [nc, g.ints([-1])], axis=0, shape=[3])], shape=[n, 6, 4])
    t = g.transpose(r, [0, 2, 1])
    b = g.op(
        "Unsqueeze",
        [g.op("Gather", [g.op("Shape", [t], shape=[3]), g.const(np.array(0))], shape=[]), g.ints([0])],
        shape=[1],
    )
    cls = g.op(
        "Expand",
        [g.const(np.ones((1, 1, 6), np.float32)), g.op("Concat", [b, g.ints([1, 6])], axis=0)],
        shape=[n, 1, 6],
    )
    x = g.op("Concat", [cls, t], axis=1, shape=[n, 5, 6])
    x = g.op("Add", [x, g.const(g.rng.standard_normal((1, 5, 6)).astype(np.float32))])
    y = g.head(g.layer_norm(g.op("Add", [x, g.mlp(g.layer_norm(x), 12)])))
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[units_of(an, p)].any()
    assert any(r.node.startswith("expand") for r in an.slice_records)  # the class token is cut with the stream
    prune_randomly(g.model([y]), modes=("heads",))


def test_embedding_table_is_a_producer():
    """BERT: rows of a constant table picked by token ids; the table's columns are the stream's channels."""
    g = TG(channels=8)
    g.inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])]
    g.shape["ids"] = ["N", 6]
    e = g.op("Gather", [g.const(g.rng.standard_normal((20, 8)).astype(np.float32)), "ids"], shape=["N", 6, 8])
    x = g.layer_norm(g.op("Add", [e, g.const(g.rng.standard_normal((1, 6, 8)).astype(np.float32))]))
    y = g.head(g.block(x, 2, 4, pre=False))
    model, an = analyse_proto(g.model([y]))
    src = next(s for s in an.sources if s.op == "Gather")
    assert src.count == 8 and not an.unit_frozen[an.source_units(src)].any()
    prune_randomly(g.model([y]))


def test_c2psa_per_head_split_of_a_convolution():
    """YOLO11's C2PSA attention: a 1x1 conv makes [q | k | v] per head; Reshape [N, H, 2kd+hd, HW], Split, q^T k,
    v attn^T, Reshape back to [N, C, H, W], plus a depthwise positional conv on v, then a 1x1 projection."""
    g = TG(image=(8, 4, 4), dynamic_batch=False)
    heads, kd, hd = 2, 2, 4
    ch = heads * (2 * kd + hd)
    qkv = g.op(
        "Conv",
        ["x", g.weight(ch, 8, 1, 1), g.const(np.zeros(ch, np.float32))],
        kernel_shape=[1, 1],
        shape=[1, ch, 4, 4],
    )
    r = g.reshape(qkv, [1, heads, 2 * kd + hd, 16])
    q, k, v = g.op("Split", [r, g.ints([kd, kd, hd])], outputs=3, axis=2, shape=[1, heads, None, 16])
    g.shape[q], g.shape[k], g.shape[v] = [1, heads, kd, 16], [1, heads, kd, 16], [1, heads, hd, 16]
    s = g.op("MatMul", [g.transpose(q, [0, 1, 3, 2]), k], shape=[1, heads, 16, 16])
    att = g.op("Softmax", [g.op("Mul", [s, g.const(np.array(kd**-0.5, np.float32))])], axis=-1)
    o = g.op("MatMul", [v, g.transpose(att, [0, 1, 3, 2])], shape=[1, heads, hd, 16])
    o = g.reshape(o, [1, heads * hd, 4, 4])
    vv = g.reshape(v, [1, heads * hd, 4, 4])
    pe = g.op(
        "Conv",
        [vv, g.weight(heads * hd, 1, 3, 3), g.const(np.zeros(heads * hd, np.float32))],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        group=heads * hd,
    )
    y = g.op("Conv", [g.op("Add", [o, pe]), g.weight(5, heads * hd, 1, 1)], kernel_shape=[1, 1], shape=[1, 5, 4, 4])
    model, an = analyse_proto(g.model([y]))
    heads_units = np.unique(an.unit_of[source(an, node_of(g, qkv)).elements])
    assert len(heads_units) == 2 and not an.unit_frozen[heads_units].any()
    _, out = prune_randomly(g.model([y]))
    an_w = out["width"][0]
    assert len(np.unique(an_w.unit_of[source(an_w, node_of(g, qkv)).elements])) == heads * (kd + hd)


# -- refusals ---------------------------------------------------------------------------------------------------------


def test_fused_contrib_attention_is_refused_by_name():
    g = TG(channels=8)
    x = g.linear("x", 12)
    g.nodes.append(
        helper.make_node(
            "Attention",
            [x, g.weight(12, 36), g.const(np.zeros(36, np.float32))],
            ["att"],
            name="fused_attn",
            domain="com.microsoft",
            num_heads=3,
        )
    )
    g.shape["att"] = g.shape[x]
    y = g.head(g.linear("att", 8))
    proto = g.model([y])
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    model, an = analyse_proto(proto)
    assert an.unit_frozen[units_of(an, x)].all()
    assert "Attention 'fused_attn' (com.microsoft) is a fused attention" in reasons(an)


def test_contraction_with_an_untracked_tensor_is_refused():
    g = TG(channels=8)
    x = g.linear("x", 4)
    other = g.op("Relu", ["x"])  # [N, T, 8]: the input's channels (frozen, graph input) on the contracted axis?
    s = g.op(
        "MatMul",
        [x, g.transpose(g.op("Slice", [other, g.ints([0]), g.ints([4]), g.ints([2])], shape=[None, 6, 4]), [0, 2, 1])],
        shape=[None, 6, 6],
    )
    y = g.head(g.op("MatMul", [g.op("Softmax", [s], axis=-1), g.linear("x", 5)], shape=[None, 6, 5]))
    model, an = analyse_proto(g.model([y]))
    assert an.unit_frozen[units_of(an, x)].all()


def test_channel_count_read_into_a_foreign_reshape_freezes():
    """A Reshape of other data whose target reads the channel count at run time (``y.reshape(x.shape)``) needs the
    count to stay: the channels are frozen. (A static count is folded to a constant when the model is loaded.)"""
    g = TG(channels=8)
    x = g.linear("x", 6)
    dims = g.op("Slice", [g.op("Shape", [x], shape=[3]), g.ints([0]), g.ints([3]), g.ints([0])], shape=[3])
    other = g.op("Slice", ["x", g.ints([0]), g.ints([6]), g.ints([2])], shape=[g.shape["x"][0], 6, 6])
    other = g.op("Reshape", [other, dims], shape=[g.shape["x"][0], 6, 6])
    y = g.head(g.op("Add", [g.linear(x, 6), other]))
    model, an = analyse_proto(g.model([y]))
    assert an.unit_frozen[units_of(an, x)].all()
    assert "the channel count is read at run time" in reasons(an)


def test_channel_count_read_into_its_own_reshape_is_followed():
    """``x.reshape(x.shape[0], x.shape[1], -1)`` (ViT's patch flatten) reads the count it keeps: followed."""
    g = TG(image=(3, 4, 4))
    n = g.shape["x"][0]
    p = g.op("Conv", ["x", g.weight(6, 3, 1, 1)], kernel_shape=[1, 1], shape=[n, 6, 4, 4])
    nc = g.op("Slice", [g.op("Shape", [p], shape=[4]), g.ints([0]), g.ints([2]), g.ints([0])], shape=[2])
    r = g.op("Reshape", [p, g.op("Concat", [nc, g.ints([-1])], axis=0, shape=[3])], shape=[n, 6, 16])
    y = g.head(g.linear(g.transpose(r, [0, 2, 1]), 5))
    model, an = analyse_proto(g.model([y]))
    assert not an.unit_frozen[units_of(an, p)].any()
    prune_randomly(g.model([y]), modes=("heads",))


def test_equal_parameters_stored_once_are_untied():
    """The dynamo exporter stores equal constants once (every zero bias of a model is one tensor): load gives each
    elementwise reader a private copy, so the layers prune independently; weights read by MatMul stay shared."""
    g = TG(channels=8)
    zero = g.const(np.zeros(6, np.float32), "bias")
    x = g.op("Add", [g.op("MatMul", ["x", g.weight(8, 6)], shape=[None, 6, 6]), zero])
    y = g.op("Add", [g.op("MatMul", [g.op("Relu", [x]), g.weight(6, 6)], shape=[None, 6, 6]), zero])
    model, an = analyse_proto(g.model([g.head(g.op("Relu", [y]))]))
    readers = [n for n in model.graph.node if n.op_type == "Add"]
    assert len({n.input[1] for n in readers}) == 2
    assert not an.unit_frozen[units_of(an, x)].any()
    prune_randomly(g.model([g.head(g.op("Relu", [y]))]), modes=("heads",))
