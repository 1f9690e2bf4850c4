"""The gate on measurements of a simulated engine (known times with jitter, no dependence on this machine's load):
two copies of one model pass 20 runs out of 20 at the default threshold; a model made slower (ResNet-32 = ResNet-20
with 12 more layers) is caught; baselines and unusable input."""

from __future__ import annotations

import json

import pytest
from conftest import bench_report

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.measure.compare import compare
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.gate import evaluate

QUICK = MeasureConfig(backend="simulated", rounds=10, min_round_ms=10, warmup_ms=50, memory=False, agreement=False)


def test_identical_models_pass_twenty_times_out_of_twenty(zoo_dir, tmp_path, simulated_backend):
    copy = tmp_path / "copy.onnx"
    copy.write_bytes((zoo_dir / "resnet20.onnx").read_bytes())
    verdicts = []
    for seed in range(20):
        cfg = MeasureConfig(**{**QUICK.__dict__, "seed": seed})
        verdicts.append(evaluate(compare(zoo_dir / "resnet20.onnx", copy, cfg)).passed)
    assert verdicts.count(True) == 20


def test_a_slower_model_is_caught(zoo_dir, simulated_backend):
    # ResNet-32 is ResNet-20 with 12 more layers: 1.6x the MACs, so the simulated engine runs it 1.6x longer
    report = compare(zoo_dir / "resnet20.onnx", zoo_dir / "resnet32.onnx", QUICK)
    result = evaluate(report)
    assert not result.passed and "B is slower than A" in result.failures[0]
    assert 0.5 < report["results"][0]["speedup"]["median"] < 0.75


def test_rules_on_constructed_reports():
    assert evaluate(bench_report([(0.97, 0.93, 1.01)])).passed  # noise around 1 passes
    assert not evaluate(bench_report([(0.90, 0.88, 0.93)])).passed  # clearly slower fails
    assert not evaluate(bench_report([(1.3, 1.2, 1.35)]), min_speedup=1.5).passed
    base = bench_report([(2.0, 1.9, 2.1)])
    assert evaluate(bench_report([(1.98, 1.9, 2.05)]), baseline=base).passed
    r = evaluate(bench_report([(1.5, 1.4, 1.6)]), baseline=base)
    assert not r.passed and "lost more than 5%" in r.failures[0]
    r = evaluate(bench_report([(2.0, 1.9, 2.1)], batch0=8), baseline=base)
    assert r.passed and "not in the baseline" in r.notes[0]
    with pytest.raises(CarveError, match="no latency results"):
        evaluate({"schema_version": 1})


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    good, bad, base = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "base.json"
    good.write_text(json.dumps(bench_report([(1.6, 1.5, 1.7)])))
    bad.write_text(json.dumps(bench_report([(0.7, 0.65, 0.75)])))
    base.write_text(json.dumps(bench_report([(2.5, 2.4, 2.6)])))
    summary = tmp_path / "summary.md"
    assert main(["gate", str(good), "--max-slowdown", "5%", "--summary", str(summary)]) == 0
    assert "carve gate: passed" in summary.read_text()
    assert main(["gate", str(bad)]) == 1
    assert main(["gate", str(good), "--baseline", str(base)]) == 1
    assert main(["gate", str(good), "--baseline", str(base), "--tolerance", "50%"]) == 0
    (tmp_path / "junk.json").write_text("not json")
    assert main(["gate", str(tmp_path / "junk.json")]) == 2
    assert main(["gate", str(tmp_path / "missing.json")]) == 2
    assert "unusable input" in capsys.readouterr().err
