"""The README's commands are true: CI runs its test command, `carve demo` works, and the tour runs as written."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

from pipeline.cli import main
from pipeline.shared import shared_dir

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
    tour = next(b for b in bash_blocks() if b[0].startswith("carve export"))
    monkeypatch.chdir(tmp_path)
    for line in tour:
        cmd = line.split("  #")[0].replace("../shared", str(shared)).replace("examples/", str(REPO / "examples") + "/")
        args = shlex.split(cmd)
        assert args[0] == "carve"
        assert main(args[1:]) == 0, line
    assert (tmp_path / "r20_q.onnx").exists() and (tmp_path / "out" / "lenet5_carved.onnx").exists()
