"""Repairs after pruning: exact fusion is exact, least squares never does worse than plain pruning on its data,
BN re-estimation measures the working model."""

from __future__ import annotations

import numpy as np
from graphs import G

import carve as P
from carve.pipeline.data.datasets import Preprocess, load_data
from carve.pipeline.graph import from_proto
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.rewrite import ensure_biases
from carve.pipeline.graph.surgery import prune, zero_removed
from carve.pipeline.pruning.repair import repairs
from carve.pipeline.runtime import ort as ortutil


def repair(name: str, model, plan, data, working=None, **options):
    """Run a registered repair as the prune flow does: on the working model (removed columns zeroed)."""
    working = working if working is not None else zero_removed(model, plan)
    result = repairs.get(name)(**options).apply(model, plan, working, data)
    return result.model, result.details, result.stats


def fuse(model, plan, **options):
    work, details, stats = repair("exact", model, plan, None, **options)
    return work, details, stats["fused_channels"]


def multiple_filter_model(act: str = "Relu", bn: bool = True):
    """Conv(8) where filter 6 (with its bias and BN) is exactly 2.5 x filter 2, then act, pool, conv."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    w[6], b[6] = 2.5 * w[2], 2.5 * b[2]
    g = G()
    a = g.op("Conv", ["x", g.const(w), g.const(b)], channels=8, kernel_shape=[3, 3], pads=[1] * 4)
    if bn:
        gamma = np.ones(8, np.float32)
        beta = rng.standard_normal(8).astype(np.float32)
        mean = rng.standard_normal(8).astype(np.float32)
        var = np.ones(8, np.float32)
        beta[6] = 2.5 * (beta[2] - mean[2]) + mean[6]  # keep channel 6 = 2.5 x channel 2 after BN
        a = g.op("BatchNormalization", [a] + [g.const(v) for v in (gamma, beta, mean, var)])
    a = g.op(act, [a])
    a = g.op("MaxPool", [a], kernel_shape=[2, 2], strides=[2, 2])
    y = g.conv(a, 4)
    model = from_proto(g.model([y]))
    return model, P.analyse(model)


def remove_channel(an, node_weight: str, channel: int) -> Plan:
    src = next(s for s in an.sources if s.weight == node_weight)
    removed = np.zeros(an.n_units, bool)
    removed[an.source_units(src)[channel]] = True
    return Plan(an, removed)


def test_exact_fusion_of_a_positive_multiple_is_exact():
    model, an = multiple_filter_model()
    w_name = model.graph.node[0].input[1]
    plan = remove_channel(an, w_name, 6)
    fused, details, n = fuse(model, plan)
    assert n == 1 and "channel 6 fused into channel 2" in details[0]
    pruned = prune(fused, plan)
    feeds = ortutil.random_feeds(model, batch=2)
    ref, out = ortutil.run(model, feeds)[0], ortutil.run(pruned, feeds)[0]
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())  # the ORIGINAL model, not the zeroed one
    plain = ortutil.run(prune(model, plan), feeds)[0]
    assert np.abs(plain - ref).max() > 1e-2  # without fusion it would lose something


def test_fusion_refuses_non_homogeneous_activations():
    model, an = multiple_filter_model(act="Sigmoid")
    plan = remove_channel(an, model.graph.node[0].input[1], 6)
    _, _, n = fuse(model, plan)
    assert n == 0


def test_fusion_gate():
    model, an = multiple_filter_model()
    w_name = model.graph.node[0].input[1]
    w = model.array(w_name).copy()
    w[6] += 0.05 * np.random.default_rng(1).standard_normal(w[6].shape).astype(np.float32)
    model.set_array(w_name, w)
    plan = remove_channel(an, w_name, 6)
    assert fuse(model, plan, gate=1e-3)[2] == 0
    assert fuse(model, plan, gate=0.5)[2] == 1


def pruned_setup(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    ensure_biases(m)
    an = P.analyse(m)
    plan = P.plan(an, 0.5)
    data = load_data("digits", preprocess=Preprocess(size=(16, 16), channels=3), samples=96)
    return m, plan, data


def test_lsq_never_increases_the_calibration_error(tiny_resnet_onnx):
    m, plan, data = pruned_setup(tiny_resnet_onnx)
    work, details, stats = repair("lsq", m, plan, data, ridge=1e-9)
    assert details and stats["errors"]
    for node, (plain, refit) in stats["errors"].items():
        assert refit <= plain + 1e-6 * abs(plain), node
    pruned = prune(work, plan)
    x, _ = data.arrays()
    ref = ortutil.run(m, {"input": x})[0]
    e_lsq = np.linalg.norm(ortutil.run(pruned, {"input": x})[0] - ref)
    e_plain = np.linalg.norm(ortutil.run(prune(m, plan), {"input": x})[0] - ref)
    assert e_lsq < e_plain


def test_bias_correction_and_bn_reestimation(tiny_resnet_onnx):
    m, plan, data = pruned_setup(tiny_resnet_onnx)
    work, details, _ = repair("bias", m, plan, data)
    assert any("bias corrected" in d for d in details)
    work, details, _ = repair("bn", m, plan, data)
    bn = next(n for n in work.graph.node if n.op_type == "BatchNormalization")
    from carve.pipeline.data.capture import with_outputs
    from carve.pipeline.runtime.ort import session

    x, _ = data.arrays()
    # the first BN's input does not depend on any other BN: its statistics are those of the data
    v = session(with_outputs(zero_removed(m, plan), [bn.input[0]])).run([bn.input[0]], {"input": x})[0]
    np.testing.assert_allclose(work.array(bn.input[3]), v.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(work.array(bn.input[4]), v.var(axis=(0, 2, 3)), rtol=1e-3, atol=1e-5)


def test_lsq_requires_biases(tiny_resnet_onnx):
    import pytest

    from carve.pipeline.errors import CarveError

    m = P.load(tiny_resnet_onnx)
    an = P.analyse(m)
    plan = P.plan(an, 0.5)
    data = load_data("digits", preprocess=Preprocess(size=(16, 16), channels=3), samples=32)
    with pytest.raises(CarveError, match="ensure_biases"):
        repair("lsq", m, plan, data)


def test_chained_repairs_each_fit_the_original(tiny_resnet_onnx):
    """Every repair fits against the original's outputs, not against the previous repair's: chaining lsq and bias
    (in either order) is as good as lsq alone (before the fix, lsq+bias undid the refit: error 0.40 vs 0.005)."""
    from carve.pipeline.pruning.prune import run_repairs
    from carve.pipeline.pruning.repair import parse_repairs

    m, plan, data = pruned_setup(tiny_resnet_onnx)
    an = plan.analysis
    x, _ = data.arrays()
    ref = ortutil.run(m, {"input": x})[0]

    def error(spec: str) -> float:
        built = [(s.name, s.build()) for s in parse_repairs(spec, where="test")]
        work, _ = run_repairs(m, an, plan, built, data, None)
        return float(np.linalg.norm(ortutil.run(prune(work, plan), {"input": x})[0] - ref) / np.linalg.norm(ref))

    plain, lsq = error("none"), error("lsq")
    assert lsq < 0.5 * plain
    for chain in ("lsq+bias", "bias+lsq"):
        assert error(chain) <= 1.05 * lsq + 1e-6, chain


def test_bias_correction_matches_every_consumers_output_mean(tiny_resnet_onnx):
    """After bias correction each consumer's output has, per channel, the original's mean on the calibration data:
    a convolution's mean is its weight on the mean *patch* (digits are centred, so border offsets read less than the
    channel mean; with channel means the 3x3 convolutions' corrected means were off)."""
    from carve.pipeline.data.capture import with_outputs
    from carve.pipeline.graph.consumers import consumer_columns
    from carve.pipeline.runtime.ort import session

    m, plan, data = pruned_setup(tiny_resnet_onnx)
    work, _, _ = repair("bias", m, plan, data)
    x, _ = data.arrays()
    names = [m.nodes[n].output[0] for n in consumer_columns(plan)]
    assert any(m.nodes[n].op_type == "Conv" for n in consumer_columns(plan))
    a = session(with_outputs(m, names)).run(names, {"input": x})
    b = session(with_outputs(work, names)).run(names, {"input": x})
    for name, ya, yb in zip(names, a, b):
        axes = tuple(i for i in range(ya.ndim) if i != 1)
        scale = np.abs(ya.mean(axes)).max() + 1e-6
        np.testing.assert_allclose(yb.mean(axes), ya.mean(axes), atol=1e-4 * scale, err_msg=name)
