"""Activation criteria (HRank, aura) and the capture machinery, on constructed cases and real digits."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G, analyse_proto

from carve.pipeline.data.activations import activation_tensor
from carve.pipeline.data.capture import ChannelMoments, capture
from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.pruning.criterion import ScoreContext, criteria
from carve.pipeline.pruning.planner import plan
from carve.plugins.criteria.aura import aura_entropy, mutual_information, quantile_edges, quantise


def test_aura_entropy_of_a_constant_map_is_zero():
    maps = np.full((2, 3, 6, 6), 1.5, np.float32)
    assert np.allclose(aura_entropy(maps), 0.0)
    noisy = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    assert (aura_entropy(noisy) > 1.0).all()


def test_aura_entropy_is_lower_for_smooth_maps():
    rng = np.random.default_rng(1)
    smooth = np.repeat(np.repeat(rng.standard_normal((4, 1, 4, 4)), 4, axis=2), 4, axis=3).astype(np.float32)
    noisy = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    assert aura_entropy(smooth).mean() < aura_entropy(noisy).mean()


def test_mutual_information_of_joint_tables():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, 10000)
    b = rng.integers(0, 4, 10000)
    indep = np.zeros((4, 4))
    np.add.at(indep, (a, b), 1)
    same = np.zeros((4, 4))
    np.add.at(same, (a, a), 1)
    assert mutual_information(indep) == pytest.approx(0.0, abs=5e-3)
    assert mutual_information(same) == pytest.approx(np.log(4), abs=1e-2)  # I(X;X) = H(X)


def test_quantise_uses_per_channel_quantiles():
    rng = np.random.default_rng(3)
    maps = np.stack([rng.standard_normal((4, 8, 8)), 100 + 5 * rng.standard_normal((4, 8, 8))], axis=1)
    q = quantise(maps, quantile_edges(maps, 4))
    for c in range(2):
        counts = np.bincount(q[:, c].ravel(), minlength=4)
        assert counts.min() > 0.15 * counts.sum()  # roughly equal occupancy in each channel


def dead_channel_model():
    """x -> Conv(8) with filter 5 all zero and a negative bias -> Relu: channel 5 is always 0."""
    g = G((1, 1, 8, 8), dynamic_batch=True)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    w[5] = 0
    b = np.zeros(8, np.float32)
    b[5] = -1
    a = g.relu(g.op("Conv", ["x", g.const(w), g.const(b)], channels=8, kernel_shape=[3, 3], pads=[1] * 4))
    y = g.conv(a, 4)
    return analyse_proto(g.model([g.relu(y)]))


@pytest.mark.parametrize("name,opts", [("hrank", {}), ("aura", {}), ("aura", {"variant": "entropy"})])
def test_activation_criteria_score_a_dead_channel_lowest(name, opts):
    model, an = dead_channel_model()
    data = load_data("digits", preprocess=Preprocess(size=(8, 8), channels=1), samples=64)
    src = next(s for s in an.producers() if s.count == 8)
    s = criteria.get(name)(**opts).element_scores(ScoreContext(an, calib=data))[src.start : src.start + 8]
    assert int(np.argmin(s)) == 5
    assert s[5] == pytest.approx(0.0, abs=1e-9)


def test_activation_criteria_need_calibration_data():
    model, an = dead_channel_model()
    with pytest.raises(CarveError, match="needs calibration data"):
        plan(an, scores="hrank")


def test_activation_tensor_follows_bn_and_relu():
    g = G()
    a = g.conv("x", 4)
    post = g.relu(g.bn(a))
    model, an = analyse_proto(g.model([g.conv(post, 2)]))
    src = next(s for s in an.producers() if s.count == 4)
    assert activation_tensor(an, src) == post
    assert activation_tensor(an, src, post=False) == a


def test_capture_reduces_on_the_fly_and_matches_numpy():
    model, an = dead_channel_model()
    src = next(s for s in an.producers() if s.count == 8)
    t = activation_tensor(an, src)
    data = load_data("digits", preprocess=Preprocess(size=(8, 8), channels=1), samples=200)
    moments = ChannelMoments()
    capture(model, [t], data, moments, batch_size=16)
    from carve.pipeline.data.capture import with_outputs
    from carve.pipeline.runtime.ort import session

    sess = session(with_outputs(model, [t]))
    x, _ = data.arrays()
    full = sess.run([t], {"x": x})[0]
    np.testing.assert_allclose(moments.mean(t), full.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(moments.var(t), full.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    assert moments.means[t].shape == (8,)  # the statistic's size, not the data's


def test_dataset_sampling_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 100)  # stored class by class, like the shared CIFAR arrays
    ds = Dataset(np.zeros((1000, 4, 4, 3), np.uint8), labels, "fake", Preprocess())
    a, b = ds.sample(50, seed=1), ds.sample(50, seed=1)
    assert np.array_equal(a.indices, b.indices)
    assert np.bincount(labels[a.indices], minlength=10).tolist() == [5] * 10
    assert not np.array_equal(a.indices, ds.sample(50, seed=2).indices)
