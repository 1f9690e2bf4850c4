"""Issue 21, class 3: a small file cannot make carve hang. YAML (recipes, sweeps, ``--option KEY=VALUE``) is bounded
in size, depth and alias expansion; a sweep in its number of points; each refusal is one line naming the file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from carve.pipeline.cli import main
from carve.pipeline.config import MAX_NODES, load_yaml
from carve.pipeline.errors import CarveError


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: width**levels leaves in ~600 bytes."""
    lines = ["  a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "bombs:\n" + "\n".join(lines) + "\n"


def _one_error(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    ("kind", "tail"),
    [
        ("sweep", "model: zoo:lenet5\nname: *a8\n"),
        ("run", "model: zoo:lenet5\npasses: [{prune: {criterion_options: *a8}}]\n"),
    ],
)
def test_an_alias_bomb_is_refused_at_once(tmp_path, kind, tail):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb() + tail)
    assert path.stat().st_size < 700
    args = [sys.executable, "-m", "carve", kind, str(path), "--out-dir", str(tmp_path / "out")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)  # before: never returned
    assert r.returncode == 1 and "alias" in _one_error(r.stderr) and str(path) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a: &a [*a]\n", "refers to itself"),
        ("model: " + "[" * 200 + "]" * 200 + "\n", "nested deeper"),
        ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
        ("model: zoo:lenet5\n" + "#" * 1_100_000 + "\n", "at most"),
    ],
    ids=["recursive", "deep", "very-deep", "huge"],
)
def test_recipes_that_are_too_deep_recursive_or_huge_are_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for cmd in (["run", str(path)], ["sweep", str(path), "--dry-run"]):
        rc = main([*cmd, "--out-dir", str(tmp_path / "out")])
        line = _one_error(capsys.readouterr().err)
        assert rc == 1 and needle in line and str(path) in line


def test_plain_documents_within_the_bounds_load_unchanged():
    doc = {"a": [1, 2.5, "x", None, True], "b": {"c": [[1], [2]]}}
    assert load_yaml("a: [1, 2.5, x, null, true]\nb: {c: [[1], [2]]}\n", "w") == doc
    shared = load_yaml("x: &x [1, 2]\ny: *x\n", "w")  # plain aliases are fine
    assert shared == {"x": [1, 2], "y": [1, 2]}
    wide = "v: [" + ", ".join(["1"] * (MAX_NODES // 2)) + "]\n"
    assert len(load_yaml(wide, "w")["v"]) == MAX_NODES // 2
    with pytest.raises(CarveError, match="expands to more than"):
        load_yaml("v: [" + ", ".join(["1"] * (MAX_NODES + 1)) + "]\n", "w")


def test_a_cli_option_value_cannot_be_an_alias_bomb(tmp_path):
    from carve import models

    src = tmp_path / "l5.onnx"
    models.export("lenet5", src)
    levels = ["&a0 [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    value = "[" + ", ".join(levels) + "]"
    args = [sys.executable, "-m", "carve", "prune", str(src), "--criterion-opt", f"k={value}"]
    r = subprocess.run([*args, "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "alias" in _one_error(r.stderr), r.stderr
