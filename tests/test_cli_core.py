"""The core commands end to end, and the contract for bad input: a clear message naming the file or node, exit 1, no
traceback, nothing written, the input untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from graphs import if_model

from carve.pipeline.cli import main
from carve.pipeline.graph import save
from carve.pipeline.runtime import ort as ortutil

REPO = Path(__file__).resolve().parents[1]


def carve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "carve", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def model_copy(tmp_path, tiny_resnet_onnx) -> Path:
    p = tmp_path / "in.onnx"
    p.write_bytes(tiny_resnet_onnx.read_bytes())
    return p


def test_inspect_shows_layers_groups_and_reasons(model_copy, capsys):
    assert main(["inspect", str(model_copy), "--groups"]) == 0
    out = capsys.readouterr().out
    assert "/stem/Conv" in out and "frozen: reaches graph output 'logits'" in out
    assert "channel groups" in out and "prunable" in out


def test_inspect_json(model_copy, capsys):
    assert main(["inspect", str(model_copy), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["summary"]["groups"] >= 4
    stem = next(r for r in info["layers"] if r["node"] == "/stem/Conv")
    assert stem["cout"] == 8 and stem["status"] == "prunable"
    fc = next(r for r in info["layers"] if r["op"] == "Gemm")
    assert fc["status"] == "frozen" and "graph output" in fc["reason"]


def test_prune_end_to_end(model_copy, tmp_path):
    out = tmp_path / "out.onnx"
    before = digest(model_copy)
    r = carve("prune", str(model_copy), "-o", str(out), "--ratio", "0.5", "--criterion", "l1", "--round-to", "2")
    assert r.returncode == 0, r.stderr
    assert "verified in ONNX Runtime" in r.stdout and "not a speed-up" in r.stdout
    assert digest(model_copy) == before
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert meta["carve.command"].startswith("carve prune")
    feeds = ortutil.random_feeds(pruned, batch=2)
    assert ortutil.run(out, feeds)[0].shape == (2, 10)
    assert out.stat().st_size < 0.5 * model_copy.stat().st_size


def test_prune_json_and_exclude(model_copy, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["prune", str(model_copy), "-o", str(out), "--ratio", "30%", "--exclude", "/stem/*", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["options"]["exclude"] == ["/stem/*"] and s["verify"]["max_abs_diff"] < 1e-4
    m = onnx.load(out)
    stem = next(n for n in m.graph.node if n.name == "/stem/Conv")
    w = next(t for t in m.graph.initializer if t.name == stem.input[1])
    assert w.dims[0] == 8  # the stem (and the residual stream it feeds) kept every channel


# -- bad input ------------------------------------------------------------------------------------------------------


def control_flow_model(path: Path) -> Path:
    onnx.save(if_model(condition_from_data=True, name="branchy"), path)
    return path


def bad_inputs(tmp_path: Path, good: Path) -> dict[str, tuple[list[str], str]]:
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(good.read_bytes()[:5000])
    text = tmp_path / "notes.onnx"
    text.write_text("not a model at all\n")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    from carve.pipeline.graph import load

    save(load(good), ext_dir / "ext.onnx", external_data=True)
    for f in ext_dir.glob("ext.onnx.*.data"):
        f.unlink()
    cf = control_flow_model(tmp_path / "cf.onnx")
    out = str(tmp_path / "result.onnx")
    return {
        "truncated": (["prune", str(trunc), "-o", out], "truncated.onnx"),
        "not onnx": (["prune", str(text), "-o", out], "notes.onnx"),
        "control flow": (["prune", str(cf), "-o", out], "If 'branchy' is control flow"),
        "missing external data": (["prune", str(ext_dir / "ext.onnx"), "-o", out], "ext.onnx."),
        "unwritable output": (["prune", str(good), "-o", "/proc/carve/out.onnx"], "does not exist"),
        "output dir missing": (["prune", str(good), "-o", str(tmp_path / "no" / "x.onnx")], "does not exist"),
        "output is input": (["prune", str(good), "-o", str(good)], "never overwrites its input"),
        "unknown criterion": (["prune", str(good), "-o", out, "--criterion", "l3"], "valid: "),
        "exclude matches nothing": (["prune", str(good), "-o", out, "--exclude", "zzz"], "matches no node"),
        "inspect missing": (["inspect", str(tmp_path / "nope.onnx")], "no such file"),
    }


def test_bad_input_contract(tmp_path, model_copy):
    cases = bad_inputs(tmp_path, model_copy)
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    for name, (args, needle) in cases.items():
        r = carve(*args)
        assert r.returncode == 1, f"{name}: rc={r.returncode} stderr={r.stderr}"
        assert needle in r.stderr, f"{name}: {r.stderr}"
        assert "Traceback" not in r.stderr + r.stdout, name
        assert not (tmp_path / "result.onnx").exists(), name
        assert not list(tmp_path.glob(".carve-*")), name
    after = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after  # nothing written, nothing changed


def test_usage_errors_exit_2(model_copy):
    r = carve("prune", str(model_copy))  # missing -o
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = carve("prune", str(model_copy), "-o", "x.onnx", "--ratio", "1.5")
    assert r.returncode == 2 and "must be in [0, 1)" in r.stderr


def _subcommands():
    import argparse

    from carve.pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_argument_has_help_and_cited_docs_exist():
    """`carve X --help` explains every argument, and every docs/*.md a help text cites is in the repository."""
    import argparse
    import re

    repo = Path(__file__).resolve().parents[1]
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"carve {name} {flag} has no help"
        text = " ".join(filter(None, [parser.description, *(a.help for a in parser._actions)]))
        for doc in re.findall(r"docs/[\w./-]+\.md", text):
            assert (repo / doc).is_file(), f"carve {name} --help cites {doc}, which does not exist"


def test_output_folders_that_are_files_are_refused(tmp_path, capsys):
    """`carve demo --out-dir` and `carve report --plots` make their folder, or say in one line why they cannot."""
    from carve.pipeline.cli import main

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    assert main(["demo", "--quick", "--out-dir", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert "--out-dir" in err and "is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "a file"
