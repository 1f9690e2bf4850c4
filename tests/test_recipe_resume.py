"""Recipes show progress for every pass and inside `gradual`, keep each finished pass's output, and `carve run
--resume` goes on from the last finished pass (issue 25 item 2); `carve eval` reports its images as it goes."""

from __future__ import annotations

import json

import pytest

from carve.pipeline.cli import main
from carve.pipeline.flows.recipe import load_recipe, run_recipe


@pytest.fixture
def recipe(tmp_path, tiny_resnet_onnx, digits_rgb):
    (tmp_path / "m.onnx").write_bytes(tiny_resnet_onnx.read_bytes())
    (tmp_path / "out").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: m.onnx\noutput: out/final.onnx\n"
        f"data: {{calib: {digits_rgb['train']}, train: {digits_rgb['train']}, eval: {digits_rgb['test']}, "
        "samples: 64, train_samples: 128, eval_samples: 100}\n"
        "passes:\n  - prune: {criterion: l1, target_macs: 0.7, round_to: 2}\n  - merge: {when: macs}\n"
    )
    return path


def test_every_pass_and_every_evaluation_report_progress(recipe):
    events = []
    run_recipe(load_recipe(recipe), progress=lambda stage, done=None, total=None, **i: events.append((stage, done)))
    # each pass said as it starts and as it finishes
    assert [d for s, d in events if s == "recipe: pass"] == [0, 1, 1, 2]
    assert ("pass prune", 1) in events and ("pass merge", 1) in events  # no timer left at 0/1
    assert any(s == "evaluate: images" and d == 100 for s, d in events)


def test_a_gradual_pass_reports_each_step_prune_and_epoch(tmp_path, tiny_resnet_onnx, digits_rgb):
    (tmp_path / "m.onnx").write_bytes(tiny_resnet_onnx.read_bytes())
    (tmp_path / "out").mkdir()
    path = tmp_path / "g.yaml"
    path.write_text(
        "model: m.onnx\noutput: out/g.onnx\n"
        f"data: {{calib: {digits_rgb['train']}, train: {digits_rgb['train']}, samples: 32, train_samples: 64}}\n"
        "passes:\n  - gradual: {target_macs: 0.6, steps: 2, prune: {criterion: l1, round_to: 2},"
        " finetune: {epochs: 1, batch: 32, flip: false}}\n"
    )
    events = []
    run_recipe(load_recipe(path), progress=lambda stage, done=None, total=None, **i: events.append((stage, done, i)))
    steps = [(d, i.get("doing")) for s, d, i in events if s == "gradual: step"]
    assert (0, "prune") in steps and (0, "fine-tune") in steps and (1, "prune") in steps and (2, None) in steps
    assert any(s == "surgery" for s, _, _ in events)  # the prune inside each step
    train = [i for s, _, i in events if s == "train: step"]
    assert train and all("loss" in i and "eta_s" in i for i in train)
    assert sum(s == "train: epoch" for s, _, _ in events) == 2  # one epoch in each of the two steps


def test_run_resume_goes_on_from_the_last_finished_pass(recipe, tmp_path, monkeypatch, capsys):
    from carve.plugins.passes.merge import Merge
    from carve.plugins.passes.prune import Prune as PrunePass

    calls = {"prune": 0}
    prune_run = PrunePass.run

    def counting(self, model, ctx):
        calls["prune"] += 1
        return prune_run(self, model, ctx)

    monkeypatch.setattr(PrunePass, "run", counting)
    merge_run = Merge.run

    def interrupted(self, model, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Merge, "run", interrupted)
    assert main(["run", str(recipe), "-q"]) == 130
    kept = tmp_path / "out" / "final.onnx.resume"
    assert f"1 finished pass(es) kept in {kept}; `carve run {recipe} --resume`" in capsys.readouterr().err
    assert sorted(p.name for p in kept.iterdir()) == ["01_prune.json", "01_prune.onnx"]
    assert not (tmp_path / "out" / "final.onnx").exists() and calls["prune"] == 1

    monkeypatch.setattr(Merge, "run", merge_run)
    assert main(["run", str(recipe), "--resume"]) == 0
    assert calls["prune"] == 1  # the finished prune was not run again
    report = json.loads((tmp_path / "out" / "final.onnx.report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["prune", "merge"] and report["cost"]["macs_ratio"] <= 0.7
    assert not kept.exists()  # done: nothing left to resume
    capsys.readouterr()

    # a changed recipe does not reuse what an earlier one left; and without --resume everything runs
    monkeypatch.setattr(Merge, "run", interrupted)
    assert main(["run", str(recipe), "-q"]) == 130
    monkeypatch.setattr(Merge, "run", merge_run)
    recipe.write_text(recipe.read_text().replace("target_macs: 0.7", "target_macs: 0.6"))
    assert main(["run", str(recipe), "--resume", "-q"]) == 0 and calls["prune"] == 3


def test_eval_shows_progress(tiny_resnet_onnx, digits_rgb, capsys):
    assert main(["eval", str(tiny_resnet_onnx), "--data", str(digits_rgb["test"]), "--samples", "200"]) == 0
    err = capsys.readouterr().err
    assert "carve eval: evaluate: images" in err and "200/200" in err


def test_a_failed_pass_keeps_one_error_line_and_says_how_to_resume_as_a_hint(recipe, tmp_path, monkeypatch, capsys):
    from carve.pipeline.errors import CarveError
    from carve.plugins.passes.merge import Merge

    def refused(self, model, ctx):
        raise CarveError("merge refused", hint="try another pass")

    monkeypatch.setattr(Merge, "run", refused)
    assert main(["run", str(recipe), "-q"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ": warning:" not in ln]
    kept = tmp_path / "out" / "final.onnx.resume"
    # the error is the first line (nothing before it) and every line under it is a hint
    assert lines[0] == "carve run: error: merge refused" and lines[1] == "  hint: try another pass"
    assert lines[2] == f"  hint: 1 finished pass(es) kept in {kept}; `carve run {recipe} --resume` goes on from there"
    assert len(lines) == 3
