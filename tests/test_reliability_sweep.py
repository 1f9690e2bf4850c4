"""Issue 21 on sweeps: unique point ids (or the file is refused), no output over an input (a model under its own
--out-dir), resume keyed by the model's content, hand-edited records checked at the door, bounded expansion, and
validation that catches per-point failures before any point runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.flows.sweep import LocalExecutor, load_sweep, run_sweep

ONE = """\
model: {model}
data: {{calib: digits:train, eval: digits:test, samples: 32}}
axes:
  criterion: [l1]
  target: {{kind: macs, values: [0.5]}}
prune: {{round_to: 1}}
bench: {{threads: 1, rounds: 3, min_round_ms: 2, warmup_ms: 2}}
"""


def write(folder: Path, text: str, name: str = "s.yaml") -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(text))
    return p


def _run(args: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_error(err: str) -> str:
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and "Traceback" not in err and "internal error" not in err, err
    return errors[0]


def test_two_points_with_one_id_refuse_the_file(tmp_path, capsys):
    text = ONE.format(model="zoo:lenet5").replace("values: [0.5]", "values: [0.5, 0.5000001]")
    path = write(tmp_path, text)
    with pytest.raises(CarveError, match="two points get the id"):
        load_sweep(path)
    rc, err = _run(["sweep", str(path), "--out-dir", str(tmp_path / "out")], capsys)
    assert rc == 1 and str(path) in _one_error(err) and not (tmp_path / "out").exists()


def test_a_grid_too_large_is_refused_at_once_in_one_line(tmp_path, capsys):
    values = ", ".join(f"{0.01 * (i + 1):.2f}" for i in range(99))
    epochs = ", ".join(str(i) for i in range(50))
    text = ONE.format(model="zoo:lenet5").replace("values: [0.5]", f"values: [{values}]")
    text = text.replace("  criterion: [l1]", f"  criterion: [l1, l2, fpgm]\n  finetune_epochs: [{epochs}]")
    text = text.replace("samples: 32}", "train: digits:train, samples: 32}")
    path = write(tmp_path, text)
    rc, err = _run(["sweep", str(path), "--out-dir", str(tmp_path / "out"), "--dry-run"], capsys)
    assert rc == 1 and "at most 10,000" in _one_error(err) and "14,850 points" in err


def test_a_model_under_its_own_out_dir_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, ONE.format(model="zoo:lenet5"))
    run_sweep(load_sweep(path), out, executor=LocalExecutor(inline=True))
    (best,) = (out / "models").glob("*.onnx")
    before = best.read_bytes()
    again = write(tmp_path, ONE.format(model=str(best)), "again.yaml")  # re-sweep the best of the last sweep
    rc, err = _run(["sweep", str(again), "--out-dir", str(out)], capsys)
    assert rc == 1 and "never overwrites its input" in _one_error(err)
    assert best.read_bytes() == before


def _points_run(sweep, out) -> list[str]:
    events: list[str] = []
    run_sweep(sweep, out, executor=LocalExecutor(inline=True), resume=True, on_event=lambda k, p, r: events.append(k))
    return events


def test_resume_is_keyed_by_the_models_content_not_its_path(tmp_path):
    from carve import models

    model = tmp_path / "m.onnx"
    models.export("lenet5", model)
    out = tmp_path / "out"
    path = write(tmp_path, ONE.format(model=str(model)))
    assert _points_run(load_sweep(path), out) == ["started", "finished"]
    assert _points_run(load_sweep(path), out) == ["skipped"]
    models.export("lenet5", model, weights="random")  # the same path, other weights
    assert _points_run(load_sweep(path), out) == ["started", "finished"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("speedup", "fast"), ("latency_ms_original", None), ("top1", 7), ("model", "../../etc/passwd"), ("id", 3)],
)
def test_a_hand_edited_record_is_redone_not_trusted(tmp_path, key, value):
    out = tmp_path / "out"
    path = write(tmp_path, ONE.format(model="zoo:lenet5"))
    sweep = load_sweep(path)
    run_sweep(sweep, out, executor=LocalExecutor(inline=True))
    (rec,) = (out / "points").glob("*.json")
    doc = json.loads(rec.read_text())
    doc[key] = value
    rec.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="is run again"):
        assert _points_run(sweep, out) == ["started", "finished"]
    assert json.loads((out / "results.json").read_text())["summary"]["ok"] == 1


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (("criterion: [l1]", 'criterion: ["l1[bogus=1]"]'), "unknown criterion 'l1[bogus=1]'"),
        (("prune: {round_to: 1}", "prune: {round_to: 1, criterion_options: {bogus: 1}}"), "has no option 'bogus'"),
        (("  criterion: [l1]", "  criterion: [l1]\n  allocator: [latency]"), "needs a target"),
        (("  criterion: [l1]", "  criterion: [l1]\n  finetune_epochs: [.inf]"), "finite"),
        (("  criterion: [l1]", "  criterion: [l1]\n  finetune_epochs: [.nan]"), "finite"),
        (("  criterion: [l1]", "  criterion: [l1]\n  repair: [[lsq, {bn: {bogus: 1}}]]"), "has no option 'bogus'"),
        (("prune: {round_to: 1}", "prune: {round_to: 1}\nseed: abc"), "seed"),
    ],
    ids=[
        "criterion-options-in-name",
        "criterion-options",
        "latency-allocator-on-macs",
        "inf-epochs",
        "nan-epochs",
        "repair-option",
        "seed-abc",
    ],
)
def test_validation_catches_every_per_point_failure_before_any_point_runs(tmp_path, capsys, edit, needle):
    text = ONE.format(model="zoo:lenet5").replace(*edit).replace("samples: 32}", "train: digits:train, samples: 32}")
    path = write(tmp_path, text)
    rc, err = _run(["sweep", str(path), "--out-dir", str(tmp_path / "out")], capsys)
    line = _one_error(err)
    assert rc == 1 and needle in line and str(path) in line, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["-.inf", "5", "[a]", "{x: 1}", "true"])
def test_a_data_source_that_is_not_a_name_is_one_line(tmp_path, capsys, value):
    """Found by the files fuzz family: `data: {calib: -.inf}` was an exit 3."""
    path = write(tmp_path, ONE.format(model="zoo:lenet5").replace("calib: digits:train", f"calib: {value}"))
    rc, err = _run(["sweep", str(path), "--out-dir", str(tmp_path / "out"), "--dry-run"], capsys)
    assert rc == 1 and "calib" in _one_error(err)
