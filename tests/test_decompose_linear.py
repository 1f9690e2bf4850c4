"""Decomposition of linear layers (issue 22 item 5): a MatMul or Gemm with a constant weight (a transformer's MLP and
projections, a classifier) splits into a basis and a coefficient layer, exact at full rank in ONNX Runtime, with the
conv pass's energy / error / target_macs / kernels options; ``merge`` multiplies the pair back; the rank channels are
prunable and ``edp`` scores them by coefficient norms."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from tgraphs import TG

import carve as P
from carve.pipeline.data.datasets import Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import from_proto
from carve.pipeline.passes import PassContext, build
from carve.pipeline.runtime import ort as ortutil


def outputs(model, seed: int = 3):
    return ortutil.run(model, ortutil.random_feeds(model, batch=2, seed=seed))


def assert_same(a, b, rtol: float = 1e-5):
    for x, y in zip(outputs(a), outputs(b)):
        np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(float(np.abs(x).max()), 1.0))


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 1000), st.integers(1, 2), st.booleans(), st.sampled_from([17, 18]))
def test_transformer_full_rank_decomposition_and_merge_are_exact(seed, blocks, fused, opset):
    g = TG(tokens=5, channels=3, seed=seed, opset=opset)
    x = g.linear("x", 8)
    for _ in range(blocks):
        x = g.block(x, 2, 4, fused=fused)
    model = from_proto(g.model([g.head(g.layer_norm(x, "fused"))]))
    linear = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and model.is_const(n.input[1])]
    d = build("decompose", energy=1.0, break_even=False)(model)
    assert d.summary["decomposed"] == len(linear) == d.summary["layers"]
    assert all(f"{n}_basis" in d.model.nodes and f"{n}_coeff" in d.model.nodes for n in linear)
    assert_same(model, d.model)
    merged = build("merge")(d.model)
    assert merged.summary["merged"] >= len(linear)
    assert_same(model, merged.model)
    assert not any(n.name.endswith(("_basis", "_coeff")) for n in merged.model.graph.node)


def _gemm_model(trans_b: int, alpha: float, beta: float, c_shape, k: int = 12, n: int = 7):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    c = rng.standard_normal(c_shape).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")]
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return from_proto(m)


GEMMS = [(0, 1.0, 1.0, (7,)), (1, 0.5, 2.0, (1, 7)), (1, 1.5, 0.0, (7,))]


@pytest.mark.parametrize("trans_b,alpha,beta,c_shape", GEMMS)
def test_gemm_attributes_survive_full_rank_split_and_merge(trans_b, alpha, beta, c_shape):
    m = _gemm_model(trans_b, alpha, beta, c_shape)
    d = build("decompose", energy=1.0, break_even=False)(m)
    assert _ops(d.model) == ["Gemm", "Gemm"] and d.summary["decomposed"] == 1
    assert_same(m, d.model)
    merged = build("merge")(d.model)
    assert _ops(merged.model) == ["Gemm"]
    assert_same(m, merged.model)


def test_low_rank_matmul_weight_decomposes_at_its_rank_with_no_error():
    rng = np.random.default_rng(1)
    g = TG(tokens=4, channels=16, seed=1)
    w = (rng.standard_normal((16, 3)) @ rng.standard_normal((3, 20))).astype(np.float32)
    y = g.op("MatMul", ["x", g.const(w)], shape=[g.shape["x"][0], 4, 20])
    m = from_proto(g.model([y]))
    d = build("decompose", energy=1 - 1e-9)(m)
    assert "rank 3 of 16" in d.details[0]
    assert d.summary["macs_layers_after"] < d.summary["macs_layers_before"]
    assert_same(m, d.model)


def test_energy_and_break_even_on_linear_layers():
    g = TG(tokens=4, channels=32, seed=2)
    y = g.linear("x", 32, bias=False)
    m = from_proto(g.model([y]))
    # a random square weight has a flat spectrum: 95% energy needs nearly full rank, above the break-even of 16
    kept = build("decompose", energy=0.95)(m)
    assert not kept.summary["decomposed"] and "break-even" in kept.details[0]
    low = build("decompose", energy=0.3, break_even=False)(m)
    full = build("decompose", energy=1.0, break_even=False)(m)
    r_low = low.model.array(low.model.nodes[f"{_first(m)}_basis"].input[1]).shape[1]
    r_full = full.model.array(full.model.nodes[f"{_first(m)}_basis"].input[1]).shape[1]
    assert r_low < r_full == 32


def _first(m) -> str:
    return next(n.name for n in m.graph.node if n.op_type == "MatMul")


def test_kernels_choose_convs_or_linear_layers(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    everything = build("decompose", energy=1.0, break_even=False)(m)
    convs = build("decompose", energy=1.0, break_even=False, kernels="conv")(m)
    linear = build("decompose", energy=1.0, break_even=False, kernels="linear")(m)
    n_conv = sum(op == "Conv" for op in _ops(m))
    n_fc = sum(op in ("Gemm", "MatMul") for op in _ops(m))
    assert convs.summary["decomposed"] == n_conv and linear.summary["decomposed"] == n_fc >= 1
    assert everything.summary["decomposed"] == n_conv + n_fc
    assert_same(m, linear.model)
    with pytest.raises(CarveError, match="kernels must be one of"):
        build("decompose", kernels="dense")


def test_data_aware_error_bound_on_a_classifier(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    data = load_data("digits", preprocess=Preprocess(size=(16, 16), channels=3), samples=128)
    d = build("decompose", error=0.2, kernels="linear", break_even=False)(m, PassContext(calib=data))
    assert d.summary["decomposed"] == 1 and d.summary["data_aware"]
    x, _ = data.arrays()
    ref = ortutil.run(m, {"input": x})[0]
    out = ortutil.run(d.model, {"input": x})[0]
    # the classifier is the last layer: the bound on its output error on the calibration data is the model's
    assert np.linalg.norm(out - ref) <= 0.2 * np.linalg.norm(ref) * 1.01


def test_linear_rank_channels_are_prunable_and_scored_by_coefficients():
    from carve.pipeline.pruning.criterion import ScoreContext, criteria

    g = TG(tokens=4, channels=6, seed=4)
    x = g.linear("x", 16)
    x = g.linear(g.gelu(x), 6)
    m = from_proto(g.model([g.head(x)]))
    d = build("decompose", energy=0.999, break_even=False, kernels="linear")(m).model
    an = P.analyse(d)
    basis = [s for s in an.producers() if s.name.endswith("_basis")]
    assert basis and all(not an.unit_frozen[an.source_units(s)].all() for s in basis)
    scores = criteria.get("edp")().element_scores(ScoreContext(an))
    for s in basis:
        coeff = d.nodes[s.name.replace("_basis", "_coeff")]
        a = d.array(coeff.input[1]).astype(np.float64)
        a = a if coeff.op_type == "Gemm" and any(x.name == "transB" and x.i for x in coeff.attribute) else a.T
        np.testing.assert_allclose(scores[s.start : s.start + s.count], np.linalg.norm(a, axis=0), rtol=1e-5)
    pruned = P.prune(d, P.plan(an, 0.3, scores="edp"))
    assert outputs(pruned)[0].shape == outputs(d)[0].shape
