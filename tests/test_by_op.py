"""Where the time goes (issue 22 item 7): ``carve bench --by-op`` breaks each model's kernel time down by op type with
ONNX Runtime's profiler, for the original and the result; the report shows the share table. No timing assertions:
what is checked is the form (shares add up, the ops the graph has are there, warm-up runs are left out)."""

from __future__ import annotations

import json

import pytest

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.measure.backends import EngineConfig
from carve.pipeline.measure.compare import compare
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.op_profile import kernel_times, op_profile
from carve.pipeline.measure.report import load_report, to_markdown


def test_op_profile_of_a_small_cnn(tiny_resnet_onnx):
    prof = op_profile(tiny_resnet_onnx, EngineConfig(threads=1, batch=2), runs=3)
    assert prof["runs"] == 3 and prof["batch"] == 2 and prof["provider"] == "CPUExecutionProvider"
    ops = {r["op"]: r for r in prof["ops"]}
    assert any("Conv" in op for op in ops), ops  # Conv or ORT's FusedConv
    assert "Gemm" in ops or "FusedGemm" in ops or "MatMul" in ops
    assert abs(sum(r["share"] for r in prof["ops"]) - 1.0) < 1e-3
    assert [r["ms"] for r in prof["ops"]] == sorted((r["ms"] for r in prof["ops"]), reverse=True)
    assert all(r["nodes"] >= 1 and r["ms"] >= 0 for r in prof["ops"])
    assert prof["kernel_ms"] == pytest.approx(sum(r["ms"] for r in prof["ops"]), rel=1e-2, abs=1e-3)


def test_kernel_times_leave_out_warmup_runs():
    def run(ts: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 5}

    def kernel(ts: int, op: str, dur: int) -> dict:
        return {"cat": "Node", "name": f"n_{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    trace = [run(0), kernel(1, "Conv", 100), run(10), kernel(11, "Conv", 7), kernel(12, "Add", 3)]
    trace.append({"cat": "Node", "name": "n_Conv_fence_before", "ts": 13, "dur": 50, "args": {"op_name": "Conv"}})
    assert {k: v["us"] for k, v in kernel_times(trace, skip_runs=1).items()} == {"Conv": 7.0, "Add": 3.0}
    assert kernel_times(trace)["Conv"]["us"] == 107.0


def test_bench_by_op_cli_and_report(tiny_resnet_onnx, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", str(tiny_resnet_onnx), str(tiny_resnet_onnx), "--by-op", "--rounds", "2"]
    assert main([*args, "--no-memory", "--no-agreement", "--min-round-ms", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| op type | A ms/run | A share | B ms/run | B share | B/A time |" in printed
    doc = json.loads(out.read_text())
    assert set(doc["by_op"]) == {"a", "b"} and doc["settings"]["by_op"] is True
    assert {r["op"] for r in doc["by_op"]["a"]["ops"]} == {r["op"] for r in doc["by_op"]["b"]["ops"]}
    md = to_markdown(load_report(out))
    assert "## Time by op type" in md and "ONNX Runtime's profiler" in md


def test_by_op_needs_the_ort_backend(tiny_resnet_onnx):
    cfg = MeasureConfig(backend="torch-cpu", by_op=True, rounds=1, memory=False, agreement=False)
    with pytest.raises(CarveError, match="`by_op` uses ONNX Runtime's profiler"):
        compare(tiny_resnet_onnx, tiny_resnet_onnx, cfg)
