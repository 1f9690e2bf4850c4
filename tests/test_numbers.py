"""Numbers that agree with each other (issue 25 item 5): whatever is printed beside a speed-up is the figures it was
computed from, labelled with their clock and statistic, the same way in bench, prune, sweep and demo; prune counts the
original's parameters once, as the file has them. Constructed figures: nothing is timed."""

from __future__ import annotations

import re

from conftest import bench_report

import carve as P
from carve.pipeline.cli.prune import latency_lines
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.measure.report import ab_text, render_results
from carve.pipeline.pruning.closed_loop import Measured
from carve.pipeline.pruning.report import LatencyReport


def test_a_speedup_is_printed_with_its_figures_clock_and_statistic():
    text = ab_text(6.891, 1.046, 2.79, (2.5, 3.1), "thread-cpu", a="original", b="pruned")
    # the medians beside it, their clock, their own ratio (6.59x), and what the speed-up is
    assert text.startswith("original 6.891 ms, pruned 1.046 ms (thread-cpu clock, medians; ratio of medians 6.59x)")
    assert "speed-up 2.79x (median of paired per-round ratios, 95% CI 2.50-3.10)" in text
    assert "(wall clock" in ab_text(1.0, 0.5, 2.0)  # a report that did not record its clock was timed on the wall


def test_the_bench_table_shows_the_ratio_of_the_medians_beside_the_speedup():
    doc = bench_report([(2.79, 2.5, 3.1)])
    r = doc["results"][0]
    r["a"] = {"median_ms": 6.891, "p90_ms": 7.0, "p99_ms": 7.2, "engine": {"clock": "wall"}}
    r["b"] = {"median_ms": 1.046, "p90_ms": 1.1, "p99_ms": 1.2}
    head, _, row = render_results(doc)[:3]
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["clock"] == "wall"
    assert cells["A median (p90, p99) ms"].startswith("6.891") and cells["B median (p90, p99) ms"].startswith("1.046")
    assert cells["ratio of medians"] == "6.59x"
    assert cells["speed-up: median of paired ratios (95% CI)"] == "**2.79x** (2.50-3.10)"


def test_prune_prints_the_ab_figures_it_computed_the_speedup_from(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    report = P.prune_model(m, P.PruneOptions(criterion="l1", ratio=0.5, round_to=2))
    measured = Measured(ratio=0.4, speedup=2.5, ci=(2.4, 2.6), a_ms=2.749, b_ms=1.2, clock="thread-cpu")
    report.latency = LatencyReport(engine="ort cpu, 1 thread, batch 1", measured=measured)
    line = next(ln for ln in latency_lines(report) if ln.startswith("measured"))
    assert "original 2.749 ms, pruned 1.200 ms (thread-cpu clock, medians; ratio of medians 2.29x)" in line
    assert "speed-up 2.50x (median of paired per-round ratios, 95% CI 2.40-2.60)" in line


def test_prune_counts_the_originals_parameters_as_the_file_has_them(tiny_resnet_onnx, digits_rgb):
    """The least-squares repair gives every conv an explicit (zero) bias to refit; those are not the original's
    parameters: `params A -> B` starts from the count bench, inspect and report give for the input file."""
    m = P.load(tiny_resnet_onnx)
    file_params = model_cost(P.load(tiny_resnet_onnx)).params
    calib = P.load_data(digits_rgb["train"], model=m, samples=64)
    opts = P.PruneOptions(criterion="l1", ratio=0.5, round_to=2, repairs=["lsq"])
    report = P.prune_model(m, opts, calib=calib)
    assert report.before.params == file_params
    assert report.after.params == model_cost(report.model).params
    assert report.to_json()["params_before"] == file_params


def test_the_profile_says_what_a_groups_share_is(tiny_resnet_onnx, tmp_path, capsys, latency_cache):
    from carve.pipeline.cli import main

    assert main(["profile", str(tiny_resnet_onnx), "--rounds", "2", "-o", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "need not sum to 100%" in out
    shares = re.findall(r"its layers alone ([\d.]+) ms = ([\d.]+)% of the whole model's time", out)
    assert shares and "of the model)" not in out


def test_the_sweep_report_labels_its_latencies_and_shows_each_points_own_ab():
    """A sweep point's latency is the common-footing value (reference / speed-up); beside it the point's own A/B
    medians with their clock, so the progress line's raw figures are in the report too."""
    from carve.pipeline.measure.sweep_report import to_markdown

    rec = {
        "id": "l1-uniform-macs0.5-none-e0",
        "point": {"criterion": "l1", "allocator": "uniform", "target_kind": "macs", "target": 0.5, "repair": "none"}
        | {"finetune_epochs": 0},
        "status": "ok",
        "macs_ratio": 0.5,
        "params_ratio": 0.5,
        "top1": 0.9,
        "top1_original": 0.95,
        "top1_agreement": 0.92,
        "measured": "ort b1 t1",
        "latency_ms_measured": 0.148,
        "latency_ms_original": 0.152,
        "clock": "thread-cpu",
        "speedup": {"median": 1.01, "ci_low": 0.99, "ci_high": 1.03},
    }
    doc = {
        "sweep": {"name": "s", "model": "m.onnx"},
        "summary": {"points": 1, "ok": 1, "failed": 0, "pareto": [rec["id"]]},
        "objective": {"accuracy": "top1", "latency_ms_reference": 0.0927, "note": "latency_ms = reference / speed-up"},
        "points": [{**rec, "latency_ms": 0.0927 / 1.01, "pareto": True}],
    }
    table = to_markdown(doc)
    head = next(ln for ln in table.splitlines() if ln.startswith("| | point"))
    row = next(ln for ln in table.splitlines() if rec["id"] in ln)
    cells = dict(zip([c.strip() for c in head.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["latency ms (reference / speed-up)"] == f"{0.0927 / 1.01:.4g}"
    assert cells["own A/B: original, pruned ms (medians)"] == "0.152, 0.148 (thread-cpu clock)"
    assert cells["speed-up: median of paired ratios (95% CI)"] == "1.01x (0.99-1.03)"
