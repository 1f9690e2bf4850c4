"""Exact passes prove equality in ONNX Runtime: BN folding, merging, full-rank decomposition; rank-r weights decompose
at rank r with no error; error falls monotonically with rank."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G

import carve as P
from carve.pipeline.data.datasets import Preprocess, load_data
from carve.pipeline.graph import from_proto
from carve.pipeline.passes import NumericCheck, PassContext, PassManager, build
from carve.pipeline.runtime import ort as ortutil


def same_outputs(a, b, batch=2, rtol=1e-5):
    feeds = ortutil.random_feeds(a, batch=batch, seed=3)
    x, y = ortutil.run(a, feeds)[0], ortutil.run(b, feeds)[0]
    np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(np.abs(x).max(), 1e-3))


def test_fold_bn_is_exact_and_removes_bn(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    r = build("fold_bn")(m)
    assert r.summary["folded"] == 5
    assert not any(n.op_type == "BatchNormalization" for n in r.model.graph.node)
    same_outputs(m, r.model)


def test_fold_bn_into_gemm_and_conv_transpose():
    g = G((1, 6))
    h = g.op("Gemm", ["x", g.weight(8, 6), g.weight(8)], channels=8, transB=1, alpha=0.5, beta=2.0)
    y = g.op("Gemm", [g.relu(g.bn(h)), g.weight(8, 3)], channels=3)
    m = from_proto(g.model([y]))
    r = build("fold_bn")(m)
    assert r.summary["folded"] == 1
    same_outputs(m, r.model)
    g = G()
    a = g.relu(g.conv("x", 4))
    up = g.op("ConvTranspose", [a, g.weight(4, 5, 2, 2)], channels=5, kernel_shape=[2, 2], strides=[2, 2])
    m = from_proto(g.model([g.conv(g.relu(g.bn(up)), 2)]))
    r = build("fold_bn")(m)
    assert r.summary["folded"] == 1
    same_outputs(m, r.model)


def test_bn_after_shared_output_is_kept():
    g = G()
    a = g.conv("x", 4)
    b = g.bn(a)
    m = from_proto(g.model([g.add(g.conv(b, 4), a)]))
    r = build("fold_bn")(m)
    assert not r.changed and "also read elsewhere" in r.details[0]


@pytest.mark.parametrize("k,pads_b", [(3, 0), (1, 0), (1, 1)])
def test_merge_linear_conv_chains(k, pads_b):
    g = G()
    a = g.conv("x", 6, k)  # k x k with padding, bias
    if pads_b:  # 1x1 (no bias) then 3x3 with padding: exact because the 1x1 has no bias
        a = g.conv(g.relu(a), 5, 1, bias=False)
        b = g.conv(a, 4, 3)
    else:
        b = g.conv(a, 4, 1)
    m = from_proto(g.model([g.relu(b)]))
    r = build("merge")(m)
    assert r.summary["merged"] >= 1
    assert sum(n.op_type == "Conv" for n in r.model.graph.node) < sum(n.op_type == "Conv" for n in m.graph.node)
    same_outputs(m, r.model)


def test_merge_skips_1x1_with_bias_before_padded_conv():
    g = G()
    a = g.conv("x", 5, 1, bias=True)
    m = from_proto(g.model([g.conv(a, 4, 3)]))
    assert not build("merge")(m).changed


def test_merge_gemm_chain_and_conv_as_fc():
    g = G((1, 6))
    h = g.op("Gemm", ["x", g.weight(8, 6), g.weight(8)], channels=8, transB=1)
    y = g.op("MatMul", [h, g.weight(8, 3)], channels=3)
    m = from_proto(g.model([y]))
    r = build("merge")(m)
    assert r.summary["merged"] == 1
    same_outputs(m, r.model)
    g = G((1, 4, 3, 3))
    c = g.op("Conv", ["x", g.weight(7, 4, 3, 3), g.weight(7)], channels=7, kernel_shape=[3, 3])  # 3x3 -> 1x1
    f = g.op("Flatten", [c], axis=1)
    y = g.op("Gemm", [f, g.weight(2, 7), g.weight(2)], channels=2, transB=1)
    m = from_proto(g.model([y]))
    r = build("merge")(m)
    assert r.summary["merged"] == 1 and not any(n.op_type == "Conv" for n in r.model.graph.node)
    same_outputs(m, r.model)


def test_decompose_full_rank_then_merge_is_the_original(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    d = build("decompose", energy=1.0, break_even=False)(m)
    assert d.summary["decomposed"] == 6  # five convs and the classifier's Gemm
    same_outputs(m, d.model)
    merged = build("merge")(d.model)
    assert merged.summary["merged"] == 6
    same_outputs(m, merged.model)
    assert sum(n.op_type == "Conv" for n in merged.model.graph.node) == 5


def test_exact_rank_weight_decomposes_at_that_rank_with_no_error():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 8 * 9))).reshape(16, 8, 3, 3).astype(np.float32)
    g = G((1, 8, 8, 8))
    y = g.op("Conv", ["x", g.const(w), g.weight(16)], channels=16, kernel_shape=[3, 3], pads=[1] * 4)
    m = from_proto(g.model([g.relu(y)]))
    d = build("decompose", energy=1 - 1e-9)(m)
    assert "rank 3 of 16" in d.details[0]
    same_outputs(m, d.model, rtol=1e-5)


def test_error_decreases_monotonically_with_rank(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    feeds = ortutil.random_feeds(m, batch=4, seed=1)
    ref = ortutil.run(m, feeds)[0]
    errors = []
    for eta in (0.5, 0.7, 0.85, 0.95, 0.99, 1.0):
        d = build("decompose", energy=eta, break_even=False)(m)
        errors.append(float(np.linalg.norm(ortutil.run(d.model, feeds)[0] - ref)))
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * np.linalg.norm(ref)


def test_break_even_is_respected_and_reported():
    g = G((1, 8, 8, 8))
    y = g.conv("x", 4, 3)  # 4 x 72: break-even 4*72/76 = 3.8
    m = from_proto(g.model([g.relu(y)]))
    d = build("decompose", energy=0.999)(m)
    assert not d.changed or "break-even" in d.details[0]
    assert "break-even" in d.details[0]


def test_data_aware_decomposition_beats_plain_svd_on_its_data(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    data = load_data("digits", preprocess=Preprocess(size=(16, 16), channels=3), samples=128)
    plain = build("decompose", target_macs=0.6)(m)
    aware = build("decompose", target_macs=0.6)(m, PassContext(calib=data))
    x, _ = data.arrays()
    ref = ortutil.run(m, {"input": x})[0]
    e_plain = np.linalg.norm(ortutil.run(plain.model, {"input": x})[0] - ref)
    e_aware = np.linalg.norm(ortutil.run(aware.model, {"input": x})[0] - ref)
    assert e_aware < e_plain


def test_target_macs_is_met(tiny_resnet_onnx):
    from carve.pipeline.graph.cost import model_cost

    m = P.load(tiny_resnet_onnx)
    d = build("decompose", target_macs=0.5, round_to=2)(m)
    assert model_cost(d.model).macs <= 0.5 * model_cost(m).macs


def test_pass_manager_numeric_check_catches_a_broken_exact_pass(tiny_resnet_onnx):
    from carve.pipeline.passes import Pass, PassResult

    class Broken(Pass):
        name = "broken"
        exact = True

        def run(self, model, ctx):
            out = model.copy()
            w = next(n for n in out.graph.node if n.op_type == "Conv").input[1]
            out.set_array(w, out.array(w) * 1.5)
            return PassResult(out, True)

    m = P.load(tiny_resnet_onnx)
    with pytest.raises(AssertionError, match="exact pass 'broken' changed"):
        PassManager([Broken()], [NumericCheck()]).run(m)
    final, results = PassManager([build("fold_bn"), build("merge")]).run(m)
    assert results[0].error["max_rel"] < 1e-5


def test_decomposed_rank_channels_are_prunable_by_coefficient_norms(tiny_resnet_onnx):
    from carve.pipeline.pruning.criterion import ScoreContext, criteria

    m = P.load(tiny_resnet_onnx)
    d = build("decompose", energy=0.9, break_even=False)(m).model
    an = P.analyse(d)
    basis = [s for s in an.producers() if s.name.endswith("_basis")]
    assert basis and all(not an.unit_frozen[an.source_units(s)].any() for s in basis)
    scores = criteria.get("edp")().element_scores(ScoreContext(an))
    for s in basis:
        coeff = next(n for n in d.graph.node if n.name == s.name.replace("_basis", "_coeff"))
        a = d.array(coeff.input[1])
        a = a[:, :, 0, 0] if a.ndim == 4 else a.T  # a conv's 1x1 coefficients, or the classifier's r x N Gemm weight
        np.testing.assert_allclose(scores[s.start : s.start + s.count], np.linalg.norm(a, axis=0), rtol=1e-5)
        # the SVD orders the spectrum: coefficient column norms (sqrt of singular values) decrease
        assert np.all(np.diff(scores[s.start : s.start + s.count]) <= 1e-6)
    pruned = P.prune(d, P.plan(an, 0.3, scores="edp"))
    feeds = ortutil.random_feeds(d)
    assert ortutil.run(pruned, feeds)[0].shape == (1, 10)
