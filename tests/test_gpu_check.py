"""The GPU check and the native-overhead tool, as far as a CPU can run them: a dry run of ``tools/gpu_check.py``
(torch-cpu and ONNX Runtime's CPU provider standing in, tiny inputs) writes a well-formed document whose every row
shows the MAC ratio beside the measured speed-up and the settings each engine applied; the README renders "not
measured yet" until a real GPU document is committed, and a real one once it is; the GPU test run is parsed from
pytest's own report."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import REPO


def tool(name: str):
    for p in (str(REPO), str(REPO / "tools")):
        if p not in sys.path:
            sys.path.insert(0, p)
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    gpu_check = tool("gpu_check")
    out = tmp_path_factory.mktemp("gpu") / "gpu_dry.json"
    # an unbounded time budget: which rows exist must not depend on how busy this machine is (the budget's own
    # behaviour is tested with a budget of 0 below)
    assert gpu_check.main(["--dry-run", "--models", "resnet18", "--budget-s", "1e9", "-o", str(out)]) == 0
    return gpu_check, json.loads(out.read_text())


def test_a_spent_time_budget_lists_what_was_not_measured(tmp_path):
    gpu_check = tool("gpu_check")
    out = tmp_path / "gpu_dry.json"
    assert gpu_check.main(["--dry-run", "--models", "resnet18", "--budget-s", "0", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rows"] == [] and doc["sanity"] is None
    spent = [s for s in doc["skipped"] if "time budget (0 s) spent" in s]
    assert any(s.startswith("resnet18 torch-cpu fp16") for s in spent) and any("timing sanity" in s for s in spent)


@pytest.mark.xdist_group("timing")
def test_dry_run_document_has_every_row_and_the_settings_applied(dry_run):
    gpu_check, doc = dry_run
    assert doc["dry_run"] and doc["device"] == "cpu-dry-run" and doc["pruning"] == gpu_check.PRUNING
    assert {"torch", "onnxruntime", "carve"} <= set(doc["versions"])
    assert doc["backends"]["measured"] == ["torch-cpu", "ort-cpu"]
    combos = {(r["backend"], r["precision"], r["batch"]) for r in doc["rows"]}
    assert combos == {(b, p, n) for b in ("torch-cpu", "ort-cpu") for p in ("fp16", "fp32") for n in (1, 2)}
    for r in doc["rows"]:
        assert 0.2 < r["mac_ratio"] < 0.35 and r["speedup"] > 0 and r["ci"][0] <= r["speedup"] <= r["ci"][1]
        assert r["engine"]["precision"] == r["precision"] and r["engine"]["cuda_graphs"] is False
    ort16 = next(r for r in doc["rows"] if r["backend"] == "ort-cpu" and r["precision"] == "fp16")
    assert ort16["engine"]["fp16_graph"] and "fp32_fallback_ops" in ort16["engine"]
    assert {r["batch"] for r in doc["native"]} == {1, 2}
    for r in doc["native"]:
        assert r["overhead"] > 0 and r["max_rel_diff"] < 1e-3  # the same model: torchvision and carve's runner agree
        assert r["native_engine"]["channels_last"] == r["carve_engine"]["channels_last"]
    assert any("torch.compile" in s for s in doc["skipped"])
    # the timing sanity check is measured by the tool (never asserted in a test); a dry run records it, judged ok
    assert doc["sanity"]["eager_over_replayed"] > 0 and doc["sanity"]["ok"] is True


@pytest.mark.xdist_group("timing")
def test_markdown_shows_mac_ratio_beside_speedup_and_readme_waits_for_a_real_gpu(dry_run):
    gpu_check, doc = dry_run
    md = gpu_check.markdown(doc)
    assert "dry run on a CPU" in md and "| MAC ratio |" in md and "speed-up" in md and "not a speed-up" in md
    assert "carve / native b1" in md and "engine settings as applied" in md and "Timing sanity" in md
    failed = {**doc, "sanity": {**doc["sanity"], "ok": False}}
    assert "FAILED" in gpu_check.markdown(failed)
    assert gpu_check.readme([]) == gpu_check.NOT_MEASURED == gpu_check.readme([doc])  # a dry run is no GPU figure
    real = {**doc, "dry_run": False, "device": "NVIDIA Test GPU"}
    assert gpu_check.readme([real]).startswith("**NVIDIA Test GPU** (")


def test_readme_says_gpu_figures_are_not_measured_while_none_is_committed():
    gpu_check = tool("gpu_check")
    readme = (REPO / "README.md").read_text()
    if not list((REPO / "benchmarks").glob("gpu_*.json")):
        assert gpu_check.NOT_MEASURED in readme
        assert "GPU engines are unmeasured" in readme


def test_gpu_check_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert tool("gpu_check").main(["--skip-tests"]) == 1
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_gpu_tests_run_and_are_counted():
    result = tool("gpu_check").run_gpu_tests(timeout=300)
    assert result["returncode"] in (0, 5) and result["failed"] == 0
    assert result["passed"] + result["skipped"] >= 10
    import torch

    if not torch.cuda.is_available():
        assert result["passed"] == 0 and any("NVIDIA GPU" in r for r in result["skip_reasons"])


def test_compile_row_compares_compiled_against_the_default(monkeypatch, tmp_path):
    """bench_native's torch.compile study on the CPU, with inductor redirected to the eager backend (inductor's C++
    build takes minutes here; the GPU check compiles for real)."""
    import torch

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    row = tool("bench_native").compile_row(
        "resnet18", 1, "fp32", "cpu", input_size=32, rounds=2, min_round_ms=5, warmup_ms=10
    )
    torch._dynamo.reset()
    assert row["compiled_engine"]["compile"] == "inductor" and row["default_engine"]["compile"] is False
    assert row["compiled_over_default"] > 0 and row["ci"][0] <= row["compiled_over_default"] <= row["ci"][1]
    assert "torch.compile + CUDA graphs ms" in tool("bench_native").markdown({"rows": [], "compile": [row]})
