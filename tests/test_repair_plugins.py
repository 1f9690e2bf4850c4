"""Repairs come from the registry: an ordered list of names with options, the same from ``carve prune``, recipes,
sweeps and the Python API, and a third-party repair installed under the ``carve.repairs`` entry-point group (a
package written here, at test time) is usable from all four."""

from __future__ import annotations

import json
import textwrap

import pytest

import carve as P
from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.pruning.repair import RepairStep, parse_repairs, repairs, with_options

PLUGIN = '''
import numpy as np

from carve.pipeline.graph.consumers import add_bias, consumer_columns
from carve.pipeline.pruning.repair import Repair, RepairResult


class Nudge(Repair):
    """Adds ``delta`` to the bias of every consumer that lost input columns (a stand-in for a real repair)."""

    description = "add delta to every pruned consumer's bias"
    needs = frozenset({"biases"})
    options = {"delta": 0.0}

    def apply(self, original, plan, working, calib=None, *, progress=None):
        cols = consumer_columns(plan)
        for name in cols:
            node = next(n for n in working.graph.node if n.name == name)
            if len(node.input) > 2 and node.input[2]:
                bias = working.array(node.input[2])
                add_bias(working, node, np.full(bias.shape, float(self.opts["delta"])))
        if progress:
            progress(f"{self.name}: layer", len(cols), len(cols))
        return RepairResult(working, [f"{n}: nudged" for n in cols], counts={"nudged": len(cols)})
'''


@pytest.fixture
def nudge(tmp_path, monkeypatch):
    """A package ``nudge_repair`` with a ``carve.repairs`` entry point ``nudge``, installed on sys.path; the registry
    reloads its entry points and is restored afterwards."""
    import importlib

    site = tmp_path / "site"
    (site / "nudge_repair-0.1.dist-info").mkdir(parents=True)
    (site / "nudge_repair.py").write_text(textwrap.dedent(PLUGIN))
    (site / "nudge_repair-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nudge-repair\nVersion: 0.1\n"
    )
    (site / "nudge_repair-0.1.dist-info" / "entry_points.txt").write_text(
        "[carve.repairs]\nnudge = nudge_repair:Nudge\n"
    )
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(repairs, "_items", dict(repairs._items))
    monkeypatch.setattr(repairs, "_loaded", False)
    assert "nudge" in repairs.names()
    return "nudge"


def test_repair_lists_parse_in_every_spelling():
    assert parse_repairs(None, where="w") == parse_repairs("none", where="w") == []
    assert [s.name for s in parse_repairs("lsq+bn", where="w")] == ["lsq", "bn"]
    steps = parse_repairs(["exact", {"lsq": {"ridge": 0.01}}, {"bn": None}], where="w")
    assert steps == [RepairStep("exact"), RepairStep("lsq", {"ridge": 0.01}), RepairStep("bn")]
    assert [s.to_json() for s in steps] == ["exact", {"lsq": {"ridge": 0.01}}, "bn"]
    with pytest.raises(CarveError, match="w: unknown repair 'glue'"):
        parse_repairs(["glue"], where="w")
    with pytest.raises(CarveError, match="repair 'lsq' has no option 'gate'"):
        parse_repairs([{"lsq": {"gate": 1}}], where="w")
    # options on the command line: to the one chosen repair that takes them, or named
    assert with_options(steps, {"gate": 0.5}, where="w")[0].options == {"gate": 0.5}
    assert with_options(steps, {"lsq.ridge": 0.1}, where="w")[1].options == {"ridge": 0.1}
    with pytest.raises(CarveError, match="none of the chosen repairs"):
        with_options(steps, {"beta": 1}, where="w")
    with pytest.raises(CarveError, match="no repair 'bias' is chosen"):
        with_options(steps, {"bias.x": 1}, where="w")


def test_repairs_run_in_the_order_given_and_options_reach_them(tiny_resnet_onnx, digits_rgb, tmp_path, capsys):
    out = tmp_path / "p.onnx"
    calib = str(digits_rgb["train"])
    args = ["prune", str(tiny_resnet_onnx), "-o", str(out), "--round-to", "1", "--calib", calib, "--samples", "32"]
    rc = main([*args, "--repair", "exact", "--repair", "bn", "--repair-opt", "gate=0.5", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["repairs"]) == ["fused_channels", "bn"]
    # the older flags still work, and say what they mean
    rc = main([*args, "--fuse", "lsq", "--ridge", "0.01", "--repair", "bn", "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "--fuse lsq is --repair lsq" in err and "--ridge 0.01 is --repair-opt lsq.ridge=0.01" in err
    history = json.loads(P.load(out).metadata()["carve.history"])
    assert list(history[-1]["summary"]["repairs"]) == ["lsq", "bn"]
    # an option no chosen repair takes is a user error naming the flag
    assert main([*args, "--repair", "bn", "--repair-opt", "ridge=1"]) == 1
    assert "--repair-opt ridge=1: none of the chosen repairs" in capsys.readouterr().err


def test_a_third_party_repair_works_from_the_cli_the_api_recipes_and_sweeps(nudge, tiny_resnet_onnx, tmp_path, capsys):
    from carve.pipeline.flows.sweep import LocalExecutor, expand, load_sweep, run_sweep

    out = tmp_path / "p.onnx"
    rc = main(
        ["prune", str(tiny_resnet_onnx), "-o", str(out), "--round-to", "1", "--repair", "nudge"]
        + ["--repair-opt", "delta=0.25", "--json"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["repairs"]["nudged"] > 0 and summary["verify"]["max_abs_diff"] >= 0  # verified against its repair
    # the Python API
    opts = P.PruneOptions(round_to=1, repairs=[{"nudge": {"delta": 0.25}}])
    report = P.prune_model(P.load(tiny_resnet_onnx), opts)
    assert report.repairs == summary["repairs"]
    # a recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_resnet_onnx}\noutput: r.onnx\n"
        "passes: [{prune: {ratio: 0.5, round_to: 1, repairs: [{nudge: {delta: 0.25}}]}}]\n"
    )
    assert main(["run", str(recipe), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["passes"][0]["summary"]["repairs"] == summary["repairs"]
    # a sweep axis
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        "model: zoo:lenet5\ndata: {eval: digits:test}\nprune: {round_to: 1}\n"
        "axes: {criterion: [l1], target: {kind: ratio, values: [0.5]}, repair: [none, nudge]}\n"
        "bench: {threads: 1, rounds: 3, min_round_ms: 2, warmup_ms: 2}\n"
    )
    sweep = load_sweep(sweep_file)
    assert [p.repair for p in expand(sweep)] == ["none", "nudge"]
    results = run_sweep(sweep, tmp_path / "sweep", executor=LocalExecutor(inline=True))
    by_id = {r["id"]: r for r in results["points"]}
    assert by_id["l1-uniform-ratio0.5-nudge-ft0"]["status"] == "ok", by_id
    assert by_id["l1-uniform-ratio0.5-nudge-ft0"]["report"]["passes"][0]["summary"]["repairs"]["nudged"] > 0
