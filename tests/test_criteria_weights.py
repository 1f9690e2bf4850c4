"""Weight-based criteria and the allocators: each checked on the property that defines it."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G, analyse_proto

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.bn import folded_filters
from carve.pipeline.pruning.allocator import allocators
from carve.pipeline.pruning.criterion import ScoreContext, criteria
from carve.pipeline.pruning.planner import plan
from carve.pipeline.pruning.scoring import kernel_dispersion
from carve.plugins.criteria.apbm import entropy, kl_importance, similarity_distributions
from carve.plugins.criteria.simfp import redundancy_scores


def layer_with_filters(filters: np.ndarray, *, bn: bool = False):
    """x -> Conv(filters as 1x1 over len(filters[0]) input channels) [-> BN] -> Relu -> Conv -> out."""
    n, cin = filters.shape
    g = G((1, cin, 4, 4))
    w = g.const(filters.reshape(n, cin, 1, 1).astype(np.float32))
    a = g.op("Conv", ["x", w], channels=n, kernel_shape=[1, 1])
    if bn:
        a = g.bn(a)
    y = g.conv(g.relu(a), 2, 1)
    model, an = analyse_proto(g.model([y]))
    src = next(s for s in an.sources if s.weight == w)
    return model, an, src


def element_scores(name, an, src, **opts):
    s = criteria.get(name)(**opts).element_scores(ScoreContext(an))
    return s[src.start : src.start + src.count]


def test_fpgm_ranks_the_mean_filter_lowest():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((3, 6))
    others = np.concatenate([base, -base])  # symmetric set: their mean (0) is the geometric median
    filters = np.concatenate([others, others.mean(0, keepdims=True)])
    _, an, src = layer_with_filters(filters)
    s = element_scores("fpgm", an, src)
    assert int(np.argmin(s)) == len(filters) - 1


def test_simfp_prunes_an_exact_duplicate_first():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((6, 8))
    f = np.concatenate([f, 2.5 * f[2:3]])  # a positive multiple of filter 2 (and the stronger of the two)
    _, an, src = layer_with_filters(f)
    s = element_scores("simfp", an, src)
    assert int(np.argmin(s)) == 2  # the weaker copy goes first, the stronger one stays
    p = plan(an, 1 / 7, scores="simfp")
    assert p.removed[an.source_units(src)][2] and p.n_removed == 1


def test_simfp_redundancy_keeps_one_representative_per_cluster():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((3, 16))
    members = np.concatenate([c + 0.01 * rng.standard_normal((4, 16)) for c in centers])
    s = redundancy_scores(members)
    top3 = np.argsort(s)[-3:]
    assert sorted(k // 4 for k in top3) == [0, 1, 2]  # one survivor from each cluster


def test_simfp_tau_prunes_unimportant_first():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((5, 8))
    f[4] *= 1e-3
    _, an, src = layer_with_filters(f)
    s = element_scores("simfp", an, src, tau=0.05)
    assert int(np.argmin(s)) == 4


def test_kernel_dispersion():
    f = np.tile(np.arange(1.0, 5.0), (4, 1))
    assert kernel_dispersion(f) == pytest.approx(0.0, abs=1e-12)
    assert kernel_dispersion(np.eye(4)) == pytest.approx(1.0)


def test_apbm_kl_importance_matches_the_definition_and_favours_distinct_filters():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((7, 5))
    p = similarity_distributions(w)
    brute = np.array([sum(np.sum(p[i] * np.log(p[i] / p[j])) for j in range(7)) for i in range(7)])
    np.testing.assert_allclose(kl_importance(p), brute, rtol=1e-9, atol=1e-12)
    # duplicates share a distribution (KL 0 between them); an outlier differs from everyone
    w = np.concatenate([np.tile(rng.standard_normal((1, 5)), (4, 1)), 10 * rng.standard_normal((1, 5))])
    w[:4] += 0.05 * rng.standard_normal((4, 5))
    s = kl_importance(similarity_distributions(w))
    assert int(np.argmax(s)) == 4
    assert np.all(entropy(similarity_distributions(w)) > 0)


def test_apbm_through_the_registry_records_entropies():
    rng = np.random.default_rng(5)
    _, an, src = layer_with_filters(rng.standard_normal((6, 4)))
    ctx = ScoreContext(an)
    criteria.get("apbm")().element_scores(ctx)
    assert len(ctx.extra["apbm_entropy"][src.name]) == 6


def test_slimming_uses_bn_gamma_and_refuses_folded_bn():
    rng = np.random.default_rng(6)
    model, an, src = layer_with_filters(rng.standard_normal((5, 4)), bn=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    gamma = model.array(bn.input[1]).copy()
    gamma[3] = 1e-4
    model.set_array(bn.input[1], gamma)
    s = element_scores("slimming", an, src)
    np.testing.assert_allclose(s, np.abs(gamma), rtol=1e-6)
    assert int(np.argmin(s)) == 3
    _, an2, _ = layer_with_filters(rng.standard_normal((5, 4)), bn=False)
    with pytest.raises(CarveError, match="BN was folded"):
        plan(an2, scores="slimming")


def test_folded_filters_apply_the_following_bn():
    rng = np.random.default_rng(7)
    model, an, src = layer_with_filters(rng.standard_normal((4, 3)), bn=True)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    g, _b, _m, v = (model.array(i) for i in bn.input[1:5])
    np.testing.assert_allclose(folded_filters(an, src), an.filters(src) * (g / np.sqrt(v + 1e-5))[:, None], rtol=1e-5)


def two_layers(first: np.ndarray, seed: int):
    """x -> Conv1x1(first: 8x4) -> Relu -> Conv1x1(random 8x8) -> Relu -> Conv(2): two independent groups."""
    g = G((1, 4, 4, 4))
    rng = np.random.default_rng(seed)
    a = g.op("Conv", ["x", g.const(first.astype(np.float32))], channels=8, kernel_shape=[1, 1])
    b = g.op(
        "Conv",
        [g.relu(a), g.const(rng.standard_normal((8, 8, 1, 1)).astype(np.float32))],
        channels=8,
        kernel_shape=[1, 1],
    )
    model, an = analyse_proto(g.model([g.conv(g.relu(b), 2, 1)]))
    return g, model, an


def two_groups():
    """Two independent layers whose score scales differ by 100x."""
    _, model, an = two_layers(np.random.default_rng(8).standard_normal((8, 4, 1, 1)) * 100, seed=80)
    return model, an


def test_global_allocator_normalises_across_groups():
    model, an = two_groups()
    p = plan(an, 0.5, scores="l1", allocator="global")
    per_group = [int(p.removed[g.units].sum()) for g in an.groups if not an.unit_frozen[g.units].all()]
    # without normalisation every removal would hit the small-scale layer; normalised, both lose channels
    assert all(k > 0 for k in per_group) and sum(per_group) == 8
    with pytest.raises(CarveError, match="unknown norm"):
        plan(an, allocator=allocators.get("global")(norm="median"))


def test_dispersion_allocator_prunes_redundant_layers_harder():
    rng = np.random.default_rng(9)
    alike = np.tile(rng.standard_normal((1, 4, 1, 1)), (8, 1, 1, 1)) + 0.05 * rng.standard_normal((8, 4, 1, 1))
    g, model, an = two_layers(alike, seed=9)
    p = plan(an, 0.4, allocator="dispersion")
    conv_a, conv_b = [n.name for n in g.nodes if n.op_type == "Conv"][:2]
    ga = next(gr for gr in an.groups if conv_a in gr.sources)
    gb = next(gr for gr in an.groups if conv_b in gr.sources)
    assert p.removed[ga.units].sum() > p.removed[gb.units].sum()
