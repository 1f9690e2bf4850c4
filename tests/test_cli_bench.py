"""carve bench -> carve report -> carve gate, end to end from the command line."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main


@pytest.mark.xdist_group("timing")
def test_bench_report_gate(zoo_dir, tmp_path, capsys):
    pruned = tmp_path / "p.onnx"
    assert main(["prune", str(zoo_dir / "resnet20.onnx"), "-o", str(pruned), "--ratio", "0.5", "-q"]) == 0
    report = tmp_path / "report.json"
    rc = main(
        [
            "bench",
            str(zoo_dir / "resnet20.onnx"),
            str(pruned),
            "--batch",
            "1,4",
            "--threads",
            "1",
            "--rounds",
            "10",
            "--min-round-ms",
            "10",
            "--warmup-ms",
            "50",
            "-o",
            str(report),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "speed-up (95% CI)" in out and "wrote" in out
    doc = json.loads(report.read_text())
    assert [r["batch"] for r in doc["results"]] == [1, 4]
    md = tmp_path / "report.md"
    assert main(["report", str(report), "-o", str(md), "--plots", str(tmp_path / "plots")]) == 0
    text = md.read_text()
    assert "## Latency" in text and "![speedup]" in text and (tmp_path / "plots" / "speedup.png").exists()
    # the gate decides on real timings: pass or fail is this machine's business, not the test's (never exit 2)
    assert main(["gate", str(report), "--max-slowdown", "5%"]) in (0, 1)
    assert main(["gate", str(report), "--min-speedup", "50"]) == 1


def test_bench_unavailable_backend_is_a_clear_error(zoo_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", str(zoo_dir / "lenet5.onnx"), str(zoo_dir / "lenet5.onnx"), "--backend", "torch-cuda"]) == 1
    assert "cannot run here" in capsys.readouterr().err


def test_bench_json_on_torch_cpu(zoo_dir, capsys):
    m = zoo_dir / "lenet5.onnx"
    flags = "--backend torch-cpu --rounds 2 --min-round-ms 5 --warmup-ms 10 --no-memory --json"
    rc = main(["bench", str(m), str(m), *flags.split()])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["backend"] == "torch-cpu" and doc["agreement"]["max_abs"] < 1e-4
