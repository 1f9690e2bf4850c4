"""The knapsack allocator under MACs or parameters (``--allocator knapsack --target-macs``): its exact cost table
against the cost model on random CNNs, the budget always holding, optimality against brute force on a small net, the
importance scale that keeps a residual stream's channels (``norm=layers``), and the CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from graphs import G
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import cnn

import carve as P
from carve.pipeline import graph as cgraph
from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError, UnreachableTarget
from carve.pipeline.graph.cost import CostModel, model_cost
from carve.pipeline.pruning.allocator import allocators
from carve.pipeline.pruning.cost_table import CostTable
from carve.pipeline.pruning.scoring import layer_counts, normalised


def resnet_stream(blocks: int = 3, width: int = 16, inner: int = 16):
    """conv(width) -> [conv(inner) -> relu -> conv(width)] + stream, ``blocks`` times -> head: one residual stream
    that every block reads and writes, and one inner group per block."""
    g = G((1, 3, 8, 8), seed=3)
    x = g.relu(g.conv("x", width))
    for _ in range(blocks):
        y = g.conv(g.relu(g.conv(x, inner)), width)
        x = g.relu(g.add(x, y))
    return cgraph.from_proto(g.model([g.head(x, 10)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn(), seed=st.integers(0, 1000), p=st.floats(0.0, 0.9), kind=st.sampled_from(["macs", "params"]))
def test_cost_table_is_the_cost_model_on_random_cnns(proto, seed, p, kind):
    a = P.analyse(cgraph.from_proto(proto))
    rng = np.random.default_rng(seed)
    removed = (rng.random(a.n_units) < p) & ~a.unit_frozen
    params, macs = CostModel(a).ratios(removed)
    assert CostTable(a, kind).predict(removed) == pytest.approx(macs if kind == "macs" else params, abs=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn(), target=st.floats(0.2, 0.95), round_to=st.sampled_from([1, 2, 4]))
def test_knapsack_never_exceeds_a_mac_target_and_keeps_widths_aligned(proto, target, round_to):
    a = P.analyse(cgraph.from_proto(proto))
    try:
        p = P.plan(a, P.Target("macs", target), scores="l1", allocator="knapsack", widths=P.Widths(round_to=round_to))
    except UnreachableTarget:
        floor = P.plan(a, 0.999, scores="l1", allocator="uniform", widths=P.Widths(round_to=round_to))
        assert CostModel(a).ratios(floor.removed)[1] > target - 0.05  # only refused when (nearly) out of reach
        return
    assert CostModel(a).ratios(p.removed)[1] <= target + 1e-9
    assert p.options["achieved_macs"] <= target + 1e-4
    assert not (p.removed & p.frozen).any()
    for g in a.groups:
        for k, sl in enumerate(g.slices):
            kept = len(sl) - int(p.removed[sl].sum())
            step = g.round_to(k, round_to)  # alignment in units: a whole group or head spans several channels
            assert kept >= 1 and (kept % step == 0 or kept == len(sl) or p.frozen[sl].any()), (g.id, kept)


def test_knapsack_under_macs_is_optimal_against_brute_force():
    m = resnet_stream(blocks=2, width=16, inner=16)
    a = P.analyse(m)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.1, 1.0, a.n_units)
    cost = CostModel(a)
    groups = [g for g in a.groups if not a.unit_frozen[g.units].all() and len(g.slices) == 1]
    assert len(groups) >= 3
    options = [range(len(g.units), 0, -4) for g in groups]  # round-to 4
    for target in (0.3, 0.5, 0.7):
        p = P.plan(
            a,
            P.Target("macs", target),
            scores=P.Scores(scores, "l1"),
            allocator=allocators.get("knapsack")(norm="none"),
            widths=P.Widths(round_to=4),
        )
        best = -np.inf
        for widths in itertools.product(*options):
            removed = np.zeros(a.n_units, dtype=bool)
            for g, w in zip(groups, widths):
                order = g.units[np.argsort(-scores[g.units], kind="stable")]
                removed[order[w:]] = True
            if cost.ratios(removed)[1] <= target + 1e-9:
                best = max(best, float(scores[~removed].sum()))
        assert cost.ratios(p.removed)[1] <= target + 1e-9
        assert float(scores[~p.removed].sum()) == pytest.approx(best, rel=1e-6), target


def test_a_stream_channel_counts_for_every_layer_it_passes_through():
    a = P.analyse(resnet_stream(blocks=3))
    counts = layer_counts(a)
    widest = max(a.groups, key=lambda g: counts[g.id])
    assert counts[widest.id] == 1 + 3 + 3 + 1  # stem conv, three block outputs, three block inputs, the head
    inner = [g for g in a.groups if counts[g.id] == 2]
    assert len(inner) == 3
    s = np.ones(a.n_units)
    n = normalised(a, s, a.unit_frozen, "layers")
    assert n[widest.units].mean() == pytest.approx(4 * n[inner[0].units].mean())  # 8 layers against 2


def test_knapsack_default_scale_keeps_the_stream_that_mean_normalising_thins():
    """Equal scores everywhere: mean normalising makes a stream channel worth an inner one while it costs far more,
    so the knapsack thins the stream first; the default (layers) weighs it by the layers it passes through."""
    a = P.analyse(resnet_stream(blocks=3))
    counts = layer_counts(a)
    stream = max(a.groups, key=lambda g: counts[g.id])
    s = np.ones(a.n_units)
    kept = {}
    for norm in ("mean", None):
        opts = {"norm": norm} if norm else {}
        knapsack = allocators.get("knapsack")(**opts)
        p = P.plan(a, P.Target("macs", 0.5), scores=P.Scores(s, "l1"), allocator=knapsack, widths=P.Widths(round_to=4))
        kept[norm] = len(stream.units) - int(p.removed[stream.units].sum())
    assert kept[None] > kept["mean"]


def test_cli_knapsack_to_a_mac_target(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    P.save(resnet_stream(), src)
    out = tmp_path / "out.onnx"
    rc = main(
        ["prune", str(src), "-o", str(out), "--allocate", "knapsack", "--target-macs", "0.5"]
        + ["--round-to", "4", "--no-measure"]
    )
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "knapsack" in text.out
    before, after = model_cost(P.load(src)), model_cost(P.load(out))
    assert after.macs / before.macs <= 0.5 + 1e-9
    rc = main(["prune", str(src), "-o", str(tmp_path / "x.onnx"), "--allocate", "knapsack", "--no-measure"])
    err = capsys.readouterr().err
    assert rc == 1 and "needs a target" in err and "Traceback" not in err
    with pytest.raises(CarveError, match="cannot reach macs"):
        P.plan(
            P.analyse(P.load(src)),
            P.Target("macs", 0.001),
            scores="l1",
            allocator="knapsack",
            widths=P.Widths(round_to=4),
        )
