"""Measurement: statistics, bootstrap intervals, interleaving in and across processes, memory, agreement, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from carve.pipeline.measure.compare import compare
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.memory import measure_in_fresh_process
from carve.pipeline.measure.report import load_report, merge, plots, to_markdown
from carve.pipeline.measure.stats import bootstrap_median_ci, latency_stats

FAST = dict(rounds=6, min_round_ms=10, warmup_ms=50)


def test_latency_stats():
    s = latency_stats(np.array([0.001, 0.002, 0.003, 0.004, 0.010]), batch=4)
    assert s["median_ms"] == pytest.approx(3.0) and s["throughput"] == pytest.approx(4 / 0.003)
    assert s["p99_ms"] > s["p90_ms"] > s["median_ms"] and s["cv"] > 0 and s["runs"] == 5


def test_bootstrap_interval_covers_and_shrinks():
    rng = np.random.default_rng(0)
    small = rng.normal(1.5, 0.1, 10)
    big = rng.normal(1.5, 0.1, 400)
    m1, lo1, hi1 = bootstrap_median_ci(small)
    m2, lo2, hi2 = bootstrap_median_ci(big)
    assert lo1 <= m1 <= hi1 and lo2 <= m2 <= hi2
    assert lo2 < 1.5 < hi2 and (hi2 - lo2) < (hi1 - lo1)
    assert bootstrap_median_ci(np.array([2.0])) == (2.0, 2.0, 2.0)


def test_compare_pruned_against_original(zoo_dir, tmp_path):
    import carve as P

    m = P.load(zoo_dir / "resnet20.onnx")
    pruned = P.prune(m, P.plan(P.analyse(m), 0.5, widths=P.Widths(round_to=8)))
    P.save(pruned, tmp_path / "p.onnx")
    r = compare(zoo_dir / "resnet20.onnx", tmp_path / "p.onnx", MeasureConfig(batch=[1, 4], **FAST))
    assert r["schema_version"] == 1 and len(r["results"]) == 2
    for res in r["results"]:
        assert res["speedup"]["ci_low"] <= res["speedup"]["median"] <= res["speedup"]["ci_high"]
        assert res["speedup"]["median"] > 0  # real timings: no claim about their size (this machine may be busy)
        assert 0.2 < res["mac_ratio"] < 0.3 and res["speedup_efficiency"] == pytest.approx(
            res["speedup"]["median"] * res["mac_ratio"]
        )
        assert len(res["speedup"]["round_ratios"]) == 6 and res["a"]["runs"] >= 6
    assert r["memory"]["a"]["1"]["peak_rss_bytes"] > r["memory"]["b"]["1"]["peak_rss_bytes"] > 0
    assert r["agreement"]["samples"] > 0 and "top1_agreement" in r["agreement"]
    json.dumps(r)  # serialisable


def test_speedup_statistics_on_known_times(zoo_dir, tmp_path, simulated_backend):
    """With a simulated engine (time proportional to MACs), the measured speed-up is the inverse MAC ratio."""
    import carve as P

    m = P.load(zoo_dir / "resnet20.onnx")
    P.save(P.prune(m, P.plan(P.analyse(m), 0.5, widths=P.Widths(round_to=8))), tmp_path / "p.onnx")
    cfg = MeasureConfig(backend=simulated_backend, memory=False, agreement=False, **FAST)
    res = compare(zoo_dir / "resnet20.onnx", tmp_path / "p.onnx", cfg)["results"][0]
    assert res["speedup"]["median"] == pytest.approx(1 / res["mac_ratio"], rel=0.05)
    assert res["speedup_efficiency"] == pytest.approx(1.0, rel=0.05)
    assert res["speedup"]["ci_low"] < res["speedup"]["median"] < res["speedup"]["ci_high"]


def test_isolated_processes(zoo_dir):
    r = compare(
        zoo_dir / "lenet5.onnx",
        zoo_dir / "lenet5.onnx",
        MeasureConfig(isolate=True, memory=False, agreement=False, **FAST),
    )
    res = r["results"][0]
    assert res["isolated"] and res["speedup"]["median"] > 0 and res["a"]["runs"] >= FAST["rounds"]
    assert res["a"]["engine"]["providers"] == ["CPUExecutionProvider"]  # info came back from the worker


def test_memory_of_a_bigger_model_is_bigger(zoo_dir):
    small = measure_in_fresh_process(zoo_dir / "lenet5.onnx")
    big = measure_in_fresh_process(zoo_dir / "vgg16_bn.onnx")
    assert big["peak_rss_bytes"] > small["peak_rss_bytes"] + 20 * 2**20  # VGG's 59 MB of weights


def test_agreement_on_a_data_file(zoo_dir):
    r = compare(
        zoo_dir / "lenet5.onnx",
        zoo_dir / "lenet5.onnx",
        MeasureConfig(memory=False, data="digits:test", rounds=2, min_round_ms=5, warmup_ms=10),
    )
    a = r["agreement"]
    assert a["inputs"] == "digits:test" and a["top1_agreement"] == 1.0 and a["max_abs"] == 0.0


def test_report_markdown_and_plots(zoo_dir, tmp_path):
    r = compare(
        zoo_dir / "lenet5.onnx",
        zoo_dir / "lenet5.onnx",
        MeasureConfig(batch=[1, 2], rounds=3, min_round_ms=5, warmup_ms=10, memory=False),
    )
    path = tmp_path / "r.json"
    path.write_text(json.dumps(r))
    doc = load_report(path)
    md = to_markdown(doc)
    assert "## Latency" in md and "speed-up: median of paired ratios (95% CI)" in md and "ratio of medians" in md
    assert "not a speed-up" in md
    files = plots(doc, tmp_path / "plots")
    assert [f.name for f in files] == ["latency.png", "speedup.png"] and all(f.stat().st_size > 1000 for f in files)
    ev = {
        "schema_version": 1,
        "kind": "carve.eval",
        "accuracy": {"model": "p.onnx", "samples": 10, "top1": 0.9, "top5": 1.0},
    }
    merged = to_markdown(merge([doc, ev]))
    assert "## Accuracy" in merged and "top-1 90.00%" in merged
    future = {"schema_version": 1, "kind": "carve.bench", "results": [], "something_new": {"x": 1}}
    assert "## something_new" in to_markdown(future)  # unknown sections are shown, not dropped


def test_fresh_process_memory_builds_the_engine_as_timed(zoo_dir):
    out = measure_in_fresh_process(zoo_dir / "lenet5.onnx", "torch-cpu", options={"channels_last": True})
    assert "error" not in out and out["weights_bytes"] > 0
    bad = measure_in_fresh_process(zoo_dir / "lenet5.onnx", "torch-cpu", options={"cuda_graphs": True})
    assert "CUDA graphs need a CUDA device" in bad["error"]
