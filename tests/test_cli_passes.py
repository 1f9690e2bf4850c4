"""decompose / merge / eval / plugins / run from the command line, on the tiny exported ResNet."""

from __future__ import annotations

import json

import onnx
import pytest

from carve.pipeline.cli import main


@pytest.fixture
def model(tmp_path, tiny_resnet_onnx):
    p = tmp_path / "m.onnx"
    p.write_bytes(tiny_resnet_onnx.read_bytes())
    return p


def test_decompose_then_merge_back(model, tmp_path, capsys):
    d, m = tmp_path / "d.onnx", tmp_path / "m2.onnx"
    assert main(["decompose", str(model), "-o", str(d), "--energy", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "decompose:" in out and "output error in ONNX Runtime" in out
    assert main(["merge", str(d), "-o", str(m), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["pass"] == "merge" and res[0]["error"]["max_rel"] < 1e-4
    meta = {p.key: p.value for p in onnx.load(m).metadata_props}
    assert [h["step"] for h in json.loads(meta["carve.history"])] == ["decompose", "merge"]


def test_decompose_warns_when_the_output_moves_far_from_the_original(zoo_dir, tmp_path, capsys):
    """A low cosine with the original is said on stderr with what to do, in flags; a close one says nothing. (The
    issue's case: ResNet-20 at energy 0.95 per layer ends at cosine 0.85, and nothing was said.)"""
    model = zoo_dir / "resnet20.onnx"
    assert main(["decompose", str(model), "-o", str(tmp_path / "low.onnx"), "--energy", "0.5", "--json"]) == 0
    captured = capsys.readouterr()
    cosine = json.loads(captured.out)[0]["error"]["cosine"]
    assert cosine < 0.95
    assert f"warning: pass 'decompose' changed the model's outputs noticeably: cosine {cosine:.3f}" in captured.err
    assert "a higher --energy" in captured.err and "`energy`" not in captured.err
    assert main(["decompose", str(model), "-o", str(tmp_path / "close.onnx"), "--energy", "0.9999", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["error"]["cosine"] >= 0.95 and "noticeably" not in captured.err


def test_decompose_error_needs_calib(model, tmp_path, capsys):
    assert main(["decompose", str(model), "-o", str(tmp_path / "x.onnx"), "--error", "0.1"]) == 1
    assert "needs calibration data" in capsys.readouterr().err


def test_merge_fold_bn(model, tmp_path, capsys):
    out = tmp_path / "f.onnx"
    assert main(["merge", str(model), "-o", str(out), "--fold-bn"]) == 0
    assert "verified exact" in capsys.readouterr().out
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(out).graph.node)


def test_eval_on_digits_with_reference(model, tmp_path, digits_rgb, capsys):
    pruned = tmp_path / "p.onnx"
    assert main(["prune", str(model), "-o", str(pruned), "--ratio", "0.3", "-q"]) == 0
    report = tmp_path / "eval.json"
    test = str(digits_rgb["test"])
    assert main(["eval", str(pruned), "--data", test, "--reference", str(model), "-o", str(report)]) == 0
    doc = json.loads(report.read_text())
    acc = doc["accuracy"]
    assert doc["schema_version"] == 1 and 0 <= acc["top1"] <= 1 and acc["samples"] > 500
    assert 0 <= acc["reference"]["top1_agreement"] <= 1 and acc["reference"]["kl_mean"] >= 0


def test_plugins_lists_everything(capsys):
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in info["criteria"]}
    assert {"l1", "l2", "random", "fpgm", "slimming", "hrank", "apbm", "aura", "simfp", "edp"} <= names
    assert {a["name"] for a in info["allocators"]} >= {"uniform", "global", "dispersion"}
    assert {p["name"] for p in info["passes"]} >= {"prune", "decompose", "merge", "fold_bn"}
    aura = next(c for c in info["criteria"] if c["name"] == "aura")
    assert aura["needs"] == ["activations"] and aura["options"]["variant"] == "mi"


def test_prune_with_lsq_and_criterion_options(model, tmp_path, digits_rgb, capsys):
    out = tmp_path / "p.onnx"
    flags = (
        f"--criterion apbm --criterion-opt temperature=0.5 --fuse lsq --calib {digits_rgb['train']} --samples 64 --json"
    )
    flags += " --round-to 2"  # the tiny model's layers are narrower than ORT CPU's default alignment
    rc = main(["prune", str(model), "-o", str(out), *flags.split()])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["repairs"]["lsq"] > 0 and s["options"]["temperature"] == 0.5
    assert s["calibration"]["samples"] == 64


def test_recipe_run_and_thresholds(model, tmp_path, digits_rgb, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: m.onnx\noutput: out.onnx\n"
        f"data: {{calib: {digits_rgb['train']}, eval: {digits_rgb['test']}, samples: 64, eval_samples: 100}}\n"
        "passes:\n  - prune: {criterion: l1, target_macs: 0.6, round_to: 2, fuse: lsq}\n  - merge: {when: macs}\n"
        "thresholds: {max_macs: 0.6}\n"
    )
    capsys.readouterr()
    assert main(["run", str(recipe), "--keep-intermediate", str(tmp_path / "steps")]) == 0
    assert "thresholds passed (max_macs 0.6); exit 0" in capsys.readouterr().out  # the verdict, also when it passes
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["cost"]["macs_ratio"] <= 0.6 and report["thresholds"]["passed"]
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["01_prune.onnx", "02_merge.onnx"]
    recipe.write_text(recipe.read_text().replace("max_macs: 0.6", "max_macs: 0.1"))
    capsys.readouterr()
    assert main(["run", str(recipe), "-o", str(tmp_path / "rep2.json")]) == 1
    out = capsys.readouterr().out
    assert "thresholds failed (max_macs 0.1): macs ratio" in out and "exit 1" in out


def test_recipe_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m.onnx\npasses: [prune]\nthreshold: {}\n")
    assert main(["run", str(bad)]) == 1
    assert "unknown key 'threshold'" in capsys.readouterr().err
