"""The README's commands are true: CI runs its test command, `carve demo` works, and the tour runs as written."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

from carve.pipeline.cli import main
from carve.pipeline.data.shared import shared_dir

README = (REPO / "README.md").read_text()


def bash_blocks() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    return [[ln for ln in b.splitlines() if ln.strip()] for b in blocks]


def test_first_lines_are_setup_plus_demo_and_the_test_command():
    first = bash_blocks()[0]
    assert len(first) == 2
    assert first[0].endswith("carve demo") and "pip install" in first[0]
    test_command = first[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command.split("#")[0].strip() in ci  # .ci/run runs exactly the README's test command


def test_ci_reruns_the_cpu_dependent_tests_as_on_an_avx512_cpu():
    """The test command pins an AVX2 CPU (conftest); CI reruns the tests marked `cpu_capability` with AVX-512 flags,
    and an outer CARVE_CPU_FLAGS is what the tests run with."""
    import os

    from conftest import AVX512_FLAGS

    ci = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")
    rerun = next(ln for ln in ci.splitlines() if "-m cpu_capability" in ln)
    assert f'CARVE_CPU_FLAGS="{AVX512_FLAGS}"' in rerun and "avx512f" in AVX512_FLAGS
    assert os.environ["CARVE_CPU_FLAGS"]  # pinned for every test (AVX2 unless set outside)
    assert "CARVE_CPU_FLAGS" in README


def test_demo(tmp_path, capsys):
    assert main(["demo", "--quick", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pruned+lsq" in out and "checker passed" in out
    import json

    doc = json.loads((tmp_path / "demo.json").read_text())
    assert doc["models"]["original"]["accuracy"]["top1"] >= 0.95
    assert doc["models"]["pruned+lsq"]["accuracy"]["top1"] >= doc["models"]["pruned"]["accuracy"]["top1"]


@pytest.mark.shared
def test_the_tour_runs_as_written(tmp_path, monkeypatch):
    shared = shared_dir()
    if shared is None or not (shared / "data" / "cifar10" / "test.npz").exists():
        pytest.skip("the tour reads ../shared/data/cifar10 (set CARVE_SHARED or put the data at ../shared)")
    tour = next(b for b in bash_blocks() if any(ln.startswith("carve export") for ln in b))
    # a newcomer's shell has no `carve` until the venv is activated: the tour says so on its first line
    assert tour[0].split("#")[0].strip() == ". .venv/bin/activate" and ".venv/bin/carve" in tour[0]
    monkeypatch.chdir(tmp_path)
    for line in tour[1:]:
        cmd = line.split("  #")[0].replace("../shared", str(shared)).replace("examples/", str(REPO / "examples") + "/")
        args = shlex.split(cmd)
        assert args[0] == "carve"
        assert main(args[1:]) == 0, line
    assert (tmp_path / "r20_q.onnx").exists() and (tmp_path / "out" / "lenet5_carved.onnx").exists()


def test_benchmark_tables_are_the_committed_json():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", REPO / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = re.findall(r"<!-- (?:bench|report):(\w+) -->", README)
    assert {"core", "backends", "criteria", "decompose", "example_report"} <= set(names)
    assert module.render(README) == README, "run python tools/update_readme.py"


def test_gpu_commands_say_what_is_missing(zoo_dir, tmp_path, monkeypatch, capsys):
    from carve.pipeline.measure.backends import get

    block = next(b for b in bash_blocks() if "--backend trt" in b[0])
    for name in ("r20.onnx", "r20_p.onnx"):
        (tmp_path / name).write_bytes((zoo_dir / "resnet20.onnx").read_bytes())
    monkeypatch.chdir(tmp_path)
    for line in block:
        args = shlex.split(line.split("  #")[0])
        backend = args[args.index("--backend") + 1]
        if get(backend).available()[0]:
            continue  # a GPU machine runs it for real in the backend tests
        assert main(args[1:]) == 1, line
        err = capsys.readouterr().err
        assert "error:" in err and ("TensorRT" in err or "CUDA" in err) and "Traceback" not in err


def test_the_github_actions_job_uses_valid_carve_commands():
    import yaml

    from carve.pipeline.cli import build_parser

    job = yaml.safe_load(re.search(r"```yaml\n(.*?)```", README, re.S).group(1))
    runs = [s["run"] for s in job["jobs"]["gate"]["steps"] if "run" in s]
    carve = [shlex.split(r.split("  #")[0]) for r in runs if r.startswith("carve ")]
    assert [c[1] for c in carve] == ["bench", "report", "gate"]
    parser = build_parser()
    for args in carve:
        parser.parse_args(args[1:])  # argparse exits (SystemExit) on anything it does not know
    assert "$GITHUB_STEP_SUMMARY" in runs[-1]


@pytest.mark.shared
def test_the_python_api_blocks_run_each_in_an_empty_folder(tmp_path, monkeypatch):
    """The README's Python blocks, each run as written in its own empty folder (nothing prepared by other tests or
    blocks): they export their model and read the shared calibration data themselves. The latency block profiles for
    real, into a private cache; nothing is asserted on time."""
    if shared_dir() is None or not (shared_dir() / "data" / "cifar10" / "train_subset.npz").exists():
        pytest.skip("the Python blocks read shared:data/cifar10/train_subset.npz (set CARVE_SHARED or ../shared)")
    monkeypatch.setenv("CARVE_CACHE", str(tmp_path / "cache"))
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 3
    written = set()
    for k, block in enumerate(blocks):
        folder = tmp_path / f"block{k}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        exec(compile(block, f"README.md python block {k}", "exec"), {})
        written |= {p.name for p in folder.iterdir()}
    assert {"vit.onnx", "r20.onnx", "r20_p.onnx", "r20_half.onnx"} <= written
