"""carve bench -> carve report -> carve gate, end to end from the command line."""

from __future__ import annotations

import json

import pytest

from carve.pipeline.cli import main


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
    assert "speed-up: median of paired ratios (95% CI)" in out and "wrote" in out
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
    engine = doc["results"][0]["a"]["engine"]
    assert engine["program"] == "static" and engine["cuda_graphs"] is False and doc["settings"]["cuda_graphs"] is None


def test_bench_engine_options_from_the_command_line():
    from carve.pipeline.cli import build_parser
    from carve.pipeline.config import from_args
    from carve.pipeline.measure.config import MeasureConfig

    parser = build_parser()
    args = parser.parse_args(
        "bench a.onnx b.onnx --no-cuda-graphs --channels-last --compile --provider-option "
        "cudnn_conv_algo_search=HEURISTIC --provider-option enable_cuda_graph=0".split()
    )
    cfg = from_args(MeasureConfig, args)
    assert cfg.cuda_graphs is False and cfg.channels_last is True and cfg.compile is True
    assert cfg.provider_options == {"cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "0"}
    ec = cfg.engine_config(1, 1)
    assert (ec.cuda_graphs, ec.channels_last, ec.compile) == (False, True, True)
    assert ec.provider_options == cfg.provider_options
    defaults = from_args(MeasureConfig, parser.parse_args(["bench", "a.onnx", "b.onnx"]))
    assert defaults.cuda_graphs is None and defaults.channels_last is None and defaults.provider_options == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "a.onnx", "b.onnx", "--provider-option", "novalue"])


def test_bench_refuses_settings_an_engine_cannot_apply(zoo_dir, capsys):
    m = str(zoo_dir / "lenet5.onnx")
    assert main(["bench", m, m, "--cuda-graphs", "--no-memory", "--rounds", "2"]) == 1
    err = capsys.readouterr().err
    assert "CUDA graphs exist only on ONNX Runtime's CUDA and TensorRT providers" in err and "Traceback" not in err
    assert main(["bench", m, m, "--backend", "torch-cpu", "--cuda-graphs", "--no-memory", "--rounds", "2"]) == 1
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err


def test_a_cuda_provider_that_cannot_load_is_one_line_with_a_true_hint(tiny_resnet_onnx):
    """`--device cuda` where ORT's CUDA provider cannot load (no GPU here): carve's one error line and hint, with no
    ONNX Runtime log before them, and no advice to install a package that is installed."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the CUDA provider may load (tests/test_gpu.py measures it)")
    m = str(tiny_resnet_onnx)
    cmd = [sys.executable, "-m", "carve", "bench", m, m, "--device", "cuda", "--rounds", "2", "--no-memory"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("carve bench: error:") and "onnxruntime" not in lines[0].split("error:")[0], r.stderr
    assert len(lines) == 2 and lines[1].startswith("  hint:"), r.stderr
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():  # the GPU build: nothing to install
        assert "install onnxruntime-gpu" not in r.stderr and "has the CUDA provider but found no usable GPU" in r.stderr
    else:  # the plain build: the GPU build is what is missing
        assert "install onnxruntime-gpu (in place of onnxruntime)" in r.stderr
