"""Latency-aware pruning: latency tables (keys, cache, invalidation, staircases), the knapsack allocator (optimality
against brute force, the budget under the table, widths on the fast steps), latency targets, the closed loop and the
CLI. Every timing here comes from fake engines with known answers (tests/conftest.py): no test depends on how fast or
busy this machine is."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import STAIRCASE_STEP
from graphs import G

import carve as P
from carve.pipeline import graph as cgraph
from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.measure.latency_table import LatencyTable, table_key
from carve.pipeline.measure.profile import ProfileSettings, candidate_widths, group_candidates, profile
from carve.pipeline.pruning.closed_loop import CPU_FLAGS_ENV, closed_loop, cpu_flags, default_alignment
from carve.plugins.allocators.knapsack import solve_mckp


def staircase_net(widths=(48, 64), seed: int = 0):
    """conv(48) -> bn -> relu -> conv(64) -> relu -> [conv(64) -> relu -> conv(64)] + residual -> relu -> head."""
    g = G((1, 3, 16, 16), seed=seed)
    x = g.relu(g.bn(g.conv("x", widths[0])))
    x = g.relu(g.conv(x, widths[1]))
    y = g.conv(g.relu(g.conv(x, widths[1])), widths[1])
    x = g.relu(g.add(x, y))
    return cgraph.from_proto(g.model([g.head(x, 10)]))


def settings(backend: str, **kw) -> ProfileSettings:
    return ProfileSettings(backend=backend, rounds=3, min_round_ms=1.0, warmup_ms=1.0, **kw)


@pytest.fixture
def net(tmp_path) -> Path:
    path = tmp_path / "net.onnx"
    P.save(staircase_net(), path)
    return path


# -- candidate widths and targets ---------------------------------------------------------------------------------


def test_candidate_widths_are_dense_near_the_top_and_coarser_below():
    w = candidate_widths(256, 8)
    assert w[0] == 256 and w == sorted(w, reverse=True)
    top = [x for x in w if x >= 128]
    assert top == list(range(256, 127, -8))  # every multiple of 8 in the top half
    below = [x for x in w if x < 128]
    assert all(x % 16 == 0 for x in below if x >= 64) and len(below) < 10
    assert candidate_widths(6, 8) == [6, 5, 4, 3, 2, 1]
    assert len(candidate_widths(2048, 8)) <= 30  # coarser steps keep big layers affordable


def test_group_candidates_of_a_multi_slice_stream():
    c = group_candidates([16, 16, 32], [0, 0, 0], 8)
    assert c[0] == [16, 16, 32] and [8, 8, 8] in c and len(c) == 16
    assert all(k % 8 == 0 for kept in c for k in kept)
    frozen = group_candidates([16], [12], 8)
    assert all(k >= 12 for (k,) in frozen)


def parse_target(value):
    return P.Target.parse("latency", value)


def test_latency_targets_parse():
    assert parse_target("0.5").fraction == 0.5 and parse_target("50%").fraction == 0.5
    assert parse_target("4ms").ms == 4.0 and parse_target("800us").ms == pytest.approx(0.8)
    assert parse_target("0.004s").ms == pytest.approx(4.0) and parse_target(0.7).fraction == 0.7
    for bad in ("2", "0", "fast", "-1ms", "0ms"):
        with pytest.raises(CarveError):
            parse_target(bad)


@pytest.mark.parametrize(
    "kind,value,ok",
    [("ratio", 0.0, True), ("ratio", 1.0, False), ("macs", 1.0, True), ("macs", 0.0, False), ("params", 1.2, False)],
)
def test_one_target_type_validates_every_kind(kind, value, ok):
    if ok:
        assert P.Target(kind, value).value == value
    else:
        with pytest.raises(CarveError, match=f"`{P.Target(kind, 0.5).option}`"):
            P.Target(kind, value)
    with pytest.raises(CarveError, match="give one of"):
        P.Target.from_options(target_macs=0.5, target_latency="4ms")
    assert P.Target.from_options(ratio=0.3) == P.Target("ratio", 0.3)
    assert P.Target.from_options(ratio=0.3, target_params=0.5) == P.Target("params", 0.5)
    with pytest.raises(CarveError):
        P.Target("macs", 4.0, absolute=True)  # only a latency may be a time


def test_default_alignment_is_a_backend_property(monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2,fma")
    assert default_alignment("ort", "cpu") == 8 and cpu_flags() == {"avx2", "fma"}
    monkeypatch.setenv(CPU_FLAGS_ENV, "avx2 avx512f")
    assert default_alignment("ort", "cpu") == 16
    assert default_alignment("trt") == 8 and default_alignment("torch-cuda") == 8
    monkeypatch.delenv(CPU_FLAGS_ENV)  # the host's own flags: whatever they are, read without error
    assert default_alignment("ort", "cpu") in (8, 16) and isinstance(cpu_flags(), frozenset)


def min_macs_at(model, align: int) -> float:
    """The smallest MAC fraction a plan at channel multiple ``align`` reaches on ``model`` (every group cut to one
    block), from the planner itself."""
    analysis = P.analyse(model)
    before = P.model_cost(model).macs
    pruned = P.prune(model, P.plan(analysis, 0.999, scores="l1", widths=P.Widths(round_to=align)))
    return P.model_cost(pruned).macs / before


# -- the knapsack -------------------------------------------------------------------------------------------------


def brute(values, costs, budget):
    best, arg = -np.inf, None
    for choice in itertools.product(*[range(len(v)) for v in values]):
        if sum(costs[g][i] for g, i in enumerate(choice)) <= budget + 1e-12:
            v = sum(values[g][i] for g, i in enumerate(choice))
            if v > best:
                best, arg = v, list(choice)
    return best, arg


def test_knapsack_is_optimal_on_hand_made_problems():
    # three groups, integer costs: with one bin per unit of budget the dynamic programme is exact
    values = [np.array([10.0, 7.0, 3.0]), np.array([8.0, 6.0, 1.0]), np.array([5.0, 4.5, 0.0])]
    costs = [np.array([6, 3, 1]), np.array([5, 2, 0]), np.array([4, 2, 0])]
    for budget in range(1, 16):
        room = budget - sum(int(c.min()) for c in costs)
        choice = solve_mckp(values, costs, budget, bins=max(room, 1))
        best, _ = brute(values, costs, budget)
        if best == -np.inf:
            assert choice is None
            continue
        assert choice is not None
        assert sum(costs[g][i] for g, i in enumerate(choice)) <= budget
        assert sum(values[g][i] for g, i in enumerate(choice)) == pytest.approx(best)


def test_knapsack_matches_brute_force_on_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n_groups = int(rng.integers(2, 5))
        values = [np.sort(rng.uniform(0, 10, int(rng.integers(2, 5))))[::-1] for _ in range(n_groups)]
        costs = [np.sort(rng.uniform(0, 5, len(v)))[::-1] for v in values]
        budget = float(rng.uniform(0, sum(c.max() for c in costs)))
        choice = solve_mckp(values, costs, budget, bins=4000)
        best, _ = brute(values, costs, budget)
        if choice is None:
            assert best == -np.inf
            continue
        cost = sum(costs[g][i] for g, i in enumerate(choice))
        value = sum(values[g][i] for g, i in enumerate(choice))
        assert cost <= budget + 1e-9  # costs are rounded up: the budget always holds
        slack = n_groups * (budget - sum(c.min() for c in costs)) / 4000  # what rounding up can cost
        assert value <= best + 1e-9 and value >= brute(values, costs, budget - slack)[0] - 1e-9


# -- tables: keys, cache, invalidation ------------------------------------------------------------------------------


def test_table_keys_change_with_everything_that_decides_latency(monkeypatch):
    m = staircase_net()
    base = dict(backend="ort", device="cpu", threads=1, batch=1, precision="fp32", step=8)
    k0 = table_key(m, **base)
    for field, value in (("backend", "trt"), ("device", "cuda"), ("threads", 2), ("batch", 8), ("step", 16)):
        assert table_key(m, **{**base, field: value}) != k0, field
    assert table_key(m, **{**base, "precision": "fp16"}) != k0
    assert table_key(staircase_net(widths=(48, 80)), **base)["model"] != k0["model"]
    assert table_key(staircase_net(seed=1), **base) == k0  # other weight values, same latency
    from carve.pipeline.measure import latency_table

    monkeypatch.setattr(latency_table, "library_versions", lambda: {"onnxruntime": "0.0.1"})
    assert table_key(m, **base) != k0  # a library upgrade is a new table


def test_profile_is_cached_and_invalidated(staircase_backend, latency_cache, monkeypatch):
    from carve.pipeline.measure import profile as prof

    m = staircase_net()
    built = []
    real = prof.GroupSubgraph.variant
    monkeypatch.setattr(prof.GroupSubgraph, "variant", lambda self, kept: built.append(kept) or real(self, kept))
    t1 = profile(m, settings(staircase_backend))
    n = len(built)
    assert n > 0 and len(list(latency_cache.glob("*.json"))) == 1
    t2 = profile(m, settings(staircase_backend))
    assert len(built) == n and t2.to_json() == t1.to_json()  # from the cache, nothing measured
    profile(m, settings(staircase_backend, batch=2))
    assert len(built) > n and len(list(latency_cache.glob("*.json"))) == 2  # another setting: measured anew
    from carve.pipeline.measure import latency_table

    monkeypatch.setattr(latency_table, "library_versions", lambda: {"onnxruntime": "99"})
    k = len(built)
    profile(m, settings(staircase_backend))
    assert len(built) > k  # new library versions invalidate the cached table


def test_a_table_refuses_another_model_or_setting(staircase_backend, latency_cache, tmp_path):
    m = staircase_net()
    t = profile(m, settings(staircase_backend))
    path = t.save(tmp_path / "t.lut.json")
    loaded = LatencyTable.load(path)
    with pytest.raises(CarveError, match="threads=1"):
        loaded.check(settings(staircase_backend, threads=2).key(m), where="t.lut.json")
    with pytest.raises(CarveError, match="another model"):
        loaded.bind(P.analyse(staircase_net(widths=(48, 80))))
    with pytest.raises(CarveError, match="not a carve latency table"):
        LatencyTable.from_json({"kind": "something"})


def test_staircase_is_measured_and_widths_land_on_its_steps(staircase_backend, latency_cache):
    m = staircase_net()
    a = P.analyse(m)
    table = profile(m, settings(staircase_backend))
    tabled = {g.group for g in table.groups}
    assert tabled == {g.id for g in a.groups if (~a.unit_frozen[g.units]).any()}
    for g in table.groups:
        fast = [sum(g.candidates[i]) for i in g.fast()]
        assert all(w % STAIRCASE_STEP == 0 for w in fast), fast  # the flat parts of each step are dropped
        widths = [sum(c) for c in g.candidates]
        assert any(w % STAIRCASE_STEP for w in widths)  # they were measured, and found slow
    bound = table.bind(a)
    for budget in (0.9, 0.75, 0.6, 0.5):
        p = P.plan(a, P.Target("latency", budget), scores="l1", latency=bound)
        assert p.allocator == "latency"
        assert bound.predict(p.removed) <= budget + 1e-9  # never over the budget under the table
        for g in a.groups:
            if g.id in tabled:
                kept = len(g.units) - int(p.removed[g.units].sum())
                assert kept % STAIRCASE_STEP == 0 or kept == len(g.units), (budget, g.id, kept)


def test_latency_allocator_respects_frozen_groups_and_keep_min(staircase_backend, latency_cache):
    m = staircase_net()
    a = P.analyse(m)
    bound = profile(m, settings(staircase_backend)).bind(a)
    first = min(bound.entries)
    node = a.groups[first].sources[0]
    p = P.plan(a, P.Target("latency", 0.8), scores="l1", widths=P.Widths(keep_min=32, exclude=[node]), latency=bound)
    assert not p.removed[a.groups[first].units].any()
    for g in a.groups:
        kept = len(g.units) - int(p.removed[g.units].sum())
        assert kept >= min(32, len(g.units))
    with pytest.raises(CarveError, match="cannot reach latency"):
        P.plan(a, P.Target("latency", 0.01), scores="l1", latency=bound)


def test_other_allocators_reach_a_latency_target_by_bisection(staircase_backend, latency_cache):
    m = staircase_net()
    a = P.analyse(m)
    bound = profile(m, settings(staircase_backend)).bind(a)
    p = P.plan(
        a, P.Target("latency", 0.6), scores="l1", allocator="uniform", widths=P.Widths(round_to=16), latency=bound
    )
    assert bound.predict(p.removed) <= 0.6 + 1e-9 and p.options["achieved_latency"] <= 0.6 + 1e-9
    with pytest.raises(CarveError, match="needs a latency table"):
        P.plan(a, P.Target("latency", 0.6), scores="l1")


def test_table_validation_states_its_error(staircase_backend, latency_cache):
    t = profile(staircase_net(), settings(staircase_backend, validate=2))
    pts = t.error["points"]
    assert len(pts) == 2 and all(p["measured"] > 0 for p in pts)
    assert t.stated_error >= max(abs(p["error"]) for p in pts)


# -- the closed loop ------------------------------------------------------------------------------------------------


class SkewedOracle:
    """Measures the table's prediction times ``skew``: a table that is off by a known amount."""

    def __init__(self, bound, analysis, skew: float) -> None:
        self.bound, self.analysis, self.skew, self.calls = bound, analysis, skew, 0

    def describe(self) -> str:
        return "fake"

    def measure(self, original, pruned) -> dict:
        self.calls += 1
        kept = P.analyse(pruned)
        removed = self.removed_of(kept)
        r = self.bound.predict(removed) * self.skew
        return {"ratio": r, "speedup": 1 / r, "ci": [1 / r, 1 / r], "a_ms": 1.0, "b_ms": r}

    def removed_of(self, pruned_analysis):
        # widths of the pruned model per group, mapped back to a removal mask of the original
        removed = np.zeros(self.analysis.n_units, dtype=bool)
        widths = {s.name: s.count for s in pruned_analysis.sources}
        for g in self.analysis.groups:
            src = next((s for s in self.analysis.sources if s.name in g.sources), None)
            if src is None or src.name not in widths:
                continue
            cut = src.count - widths[src.name]
            if cut > 0:
                removed[g.units[len(g.units) - cut :]] = True
        return removed


def test_closed_loop_corrects_a_table_that_is_off(staircase_backend, latency_cache):
    m = staircase_net()
    a = P.analyse(m)
    bound = profile(m, settings(staircase_backend)).bind(a)
    oracle = SkewedOracle(bound, a, skew=1.25)  # the real engine is 25% slower than the table says

    def replan(budget):
        return P.plan(a, P.Target("latency", budget), scores="l1", latency=bound)

    target = parse_target(0.6)
    chosen, record = closed_loop(m, a, replan(0.6), replan, target, oracle, error=0.05, refine=2)
    steps = record.steps
    assert oracle.calls == len(steps) >= 2  # measured, missed, refined
    assert steps[0].miss > 0.05 and steps[1].budget < steps[0].budget
    assert abs(record.kept.miss) < abs(steps[0].miss)
    exact = SkewedOracle(bound, a, skew=1.0)
    _, rec = closed_loop(m, a, replan(0.6), replan, target, exact, error=0.05, refine=2)
    assert len(rec.steps) == 1 and rec.met  # within the error: no refinement


# -- the command line ------------------------------------------------------------------------------------------------


def test_profile_then_prune_with_the_table(net, tmp_path, staircase_backend, latency_cache, capsys):
    lut = tmp_path / "net.lut.json"
    assert main(["profile", str(net), "--backend", staircase_backend, "--rounds", "3", "-o", str(lut)]) == 0
    out = capsys.readouterr().out
    assert "fast widths" in out and "stated error" in out
    doc = json.loads(lut.read_text())
    assert doc["kind"] == "carve.latency_table" and doc["key"]["backend"] == staircase_backend
    pruned = tmp_path / "fast.onnx"
    rc = main(
        ["prune", str(net), "-o", str(pruned), "--target-latency", "0.6", "--lut", str(lut)]
        + ["--backend", staircase_backend]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "measured on staircase" in out and "clock, medians; ratio of medians" in out
    summary = json.loads(P.load(pruned).metadata()["carve.prune"])
    lat = summary["latency"]
    assert lat["predicted"] <= lat["loop"]["steps"][0]["budget"] + 1e-9
    assert lat["measured"]["ratio"] < 1.0
    # an absolute budget in ms against the same table
    ms = 0.6 * doc["model_ms"]
    rc = main(
        ["prune", str(net), "-o", str(tmp_path / "abs.onnx"), "--target-latency", f"{ms:.4f}ms", "--lut", str(lut)]
        + ["--backend", staircase_backend, "--json"]
    )
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["latency"]["loop"]["target"].endswith("ms")


def test_cli_refuses_an_impossible_latency_target(net, tmp_path, staircase_backend, latency_cache, capsys):
    rc = main(["prune", str(net), "-o", str(tmp_path / "x.onnx"), "--target-latency", "0.01", "--backend", "staircase"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach latency 0.01" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit) as exc:  # a usage error: 3 is neither a fraction nor a time
        main(["prune", str(net), "-o", str(tmp_path / "x.onnx"), "--target-latency", "3"])
    assert exc.value.code == 2 and "fraction" in capsys.readouterr().err


def test_cli_refuses_a_table_of_another_setting(net, tmp_path, staircase_backend, latency_cache, capsys):
    lut = tmp_path / "net.lut.json"
    assert main(["profile", str(net), "--backend", staircase_backend, "--rounds", "2", "-o", str(lut), "-q"]) == 0
    rc = main(
        ["prune", str(net), "-o", str(tmp_path / "x.onnx"), "--target-latency", "0.6", "--lut", str(lut)]
        + ["--backend", staircase_backend, "--batch", "4"]
    )
    assert rc == 1 and "batch=1" in capsys.readouterr().err


def test_prune_measures_by_default_and_says_when_the_result_is_slower(
    net, tmp_path, staircase_backend, latency_cache, capsys, monkeypatch
):
    from conftest import _StaircaseEngine

    out = tmp_path / "p.onnx"
    assert main(["prune", str(net), "-o", str(out), "--ratio", "0.5", "--backend", staircase_backend]) == 0
    text = capsys.readouterr().out
    assert "faster" in text and "beside a MAC ratio" in text
    assert f"round-to {default_alignment(staircase_backend)}" in text  # aligned for the backend by default
    assert main(["prune", str(net), "-o", str(out), "--ratio", "0.5", "--no-measure", "-q"]) == 0
    assert "latency" not in json.loads(P.load(out).metadata()["carve.prune"])
    # an engine on which every pruned whole model runs 3x slower than its table promised
    monkeypatch.setattr(_StaircaseEngine, "slowdown", 3.0)
    rc = main(
        ["prune", str(net), "-o", str(out), "--target-latency", "0.7", "--backend", staircase_backend, "--refine", "1"]
    )
    text = capsys.readouterr().out
    assert rc == 1 and "SLOWER THAN THE ORIGINAL" in text and "a speed-up was asked" in text
    assert out.exists()  # written, and said so


def test_recipe_prune_pass_takes_a_latency_target(net, tmp_path, staircase_backend, latency_cache):
    from carve.pipeline.passes import PassContext, build

    m = P.load(net)
    result = build("prune", target_latency=0.6, backend=staircase_backend, criterion="l1")(m, PassContext())
    lat = result.summary["latency"]
    assert lat["loop"]["steps"] and any("measured on" in d for d in result.details)


def test_python_api_prune_measured(net, staircase_backend, latency_cache):
    from carve.pipeline.flows.prune import prune_measured

    opts = P.PruneOptions(criterion="l1", target_latency=0.6, backend=staircase_backend)
    report = prune_measured(P.load(net), opts)
    assert report.latency.measured.ratio < 1.0 and report.to_json()["latency"]["measured"]["ratio"] < 1.0
    with pytest.raises(CarveError, match="needs measurements"):
        P.prune_model(P.load(net), opts)


def test_the_readme_latency_commands_run(zoo_dir, tmp_path, monkeypatch, staircase_backend, latency_cache):
    """The README's latency block as written, on the staircase engine instead of ONNX Runtime (no real timing)."""
    import re
    import shlex

    from conftest import REPO, need_shared

    shared = need_shared("data", "cifar10", "train_subset.npz").parents[2]
    readme = (REPO / "README.md").read_text()
    blocks = [[ln for ln in b.splitlines() if ln.strip()] for b in re.findall(r"```bash\n(.*?)```", readme, re.S)]
    block = next(b for b in blocks if b[0].startswith("carve profile"))
    (tmp_path / "r20.onnx").write_bytes((zoo_dir / "resnet20.onnx").read_bytes())
    monkeypatch.chdir(tmp_path)
    for line in block:
        cmd = line.split("  #")[0].replace("../shared", str(shared)).replace("--backend ort", "--backend staircase")
        args = shlex.split(cmd)
        assert main(args[1:]) == 0, line
    assert (tmp_path / "r20.lut.json").exists() and (tmp_path / "r20_fast.onnx").exists()
    fast = json.loads(P.load(tmp_path / "r20_fast.onnx").metadata()["carve.prune"])
    assert fast["latency"]["measured"]["ratio"] < 1.0 and fast["allocator"] == "latency"
    half = json.loads(P.load(tmp_path / "r20_half.onnx").metadata()["carve.prune"])
    assert half["allocator"] == "knapsack" and half["macs_after"] <= 0.5 * half["macs_before"]


def test_gradual_pass_steps_toward_a_latency_target(net, staircase_backend, latency_cache):
    """Issue 12 item 4: gradual pruning toward a latency target: each step's latency is measured on the engine."""
    from carve.pipeline.data.datasets import Dataset
    from carve.pipeline.passes import PassContext, build

    rng = np.random.default_rng(0)
    train = Dataset(rng.random((64, 3, 16, 16), dtype=np.float32), rng.integers(0, 10, 64), "random")
    gradual = build(
        "gradual",
        target_latency=0.5,
        steps=2,
        prune={"criterion": "l1", "backend": staircase_backend},
        finetune={"steps": 2, "batch": 16, "flip": False, "crop_pad": 0, "threads": 1},
    )
    result = gradual(P.load(net), PassContext(train=train))
    steps = result.summary["steps"]
    assert [round(s["keep_latency"], 4) for s in steps] == [round(0.5**0.5, 4), 0.5]
    ratios = [s["latency_ratio"] for s in steps]
    assert ratios[0] > ratios[1] and ratios[1] < 0.5 * 1.15  # the closed loop's tolerance on the fake engine
    with pytest.raises(CarveError, match="not both"):
        build("gradual", target_latency=0.5, target_macs=0.5, steps=2)


@pytest.mark.parametrize("flags, align", [("sse4_2 avx2 fma", 8), ("avx2 avx512f avx512bw", 16)])
def test_default_alignment_halves_when_a_target_is_out_of_its_reach(monkeypatch, flags, align):
    """The backend's alignment is a default, not a wall: a target it cannot reach on narrow layers is planned at a
    finer alignment, with a warning; a --round-to the user gave is kept and the target refused. Run as on an AVX2-only
    CPU (ONNX Runtime's default alignment 8) and as on an AVX-512 one (16)."""
    from carve.pipeline.errors import CarveWarning, UnreachableTarget

    monkeypatch.setenv(CPU_FLAGS_ENV, flags)
    # a target below what the default alignment can reach: each of the three layers keeps one block of `align`
    target = 0.5 * min_macs_at(staircase_net(), align)
    opts = P.PruneOptions(criterion="l1", target_macs=target, measure=False, verify=False)
    assert opts.alignment() == align
    with pytest.raises(UnreachableTarget):
        P.prune_model(staircase_net(), P.PruneOptions(criterion="l1", target_macs=target, round_to=align))
    with pytest.warns(CarveWarning, match="planned with `round_to` "):
        report = P.prune_model(staircase_net(), opts)
    assert report.round_to < align and report.after.macs <= target * report.before.macs + 1e-9
