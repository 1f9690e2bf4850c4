"""Every bad input a clear error (issue 11, items 7, 8, 9, 10, 15, 16, 17): one line naming the file or flag and what
to do, exit 1 for user errors and 2 for usage errors (argparse's) and unusable gate reports, never exit 3; the gate
refuses reports too thin to decide; progress is shown; recipes resolve paths against their own folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, bench_report

from carve.pipeline.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout, stderr of ``carve ARGS`` (argparse's SystemExit is an exit code too)."""
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str, rc: int) -> str:
    """The error is one line (plus an optional hint line), without a traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [ln for ln in lines if ": error:" in ln]
    assert len(errors) == 1, err
    rest = [ln for ln in lines if ln not in errors and not ln.startswith("  hint:") and ": warning:" not in ln]
    if rc == 2 and rest:  # argparse prints its usage first
        assert rest[0].startswith("usage:"), err
    else:
        assert not rest, err
    return errors[0]


@pytest.fixture
def lenet(zoo_dir, tmp_path) -> Path:
    p = tmp_path / "l5.onnx"
    p.write_bytes((zoo_dir / "lenet5.onnx").read_bytes())
    return p


@pytest.fixture
def r20(zoo_dir, tmp_path) -> Path:
    p = tmp_path / "r20.onnx"
    p.write_bytes((zoo_dir / "resnet20.onnx").read_bytes())
    return p


def _dynamic_channels(src: Path, dst: Path) -> Path:
    m = onnx.load(src)
    d = m.graph.input[0].type.tensor_type.shape.dim[1]
    d.Clear()
    d.dim_param = "C"
    del m.metadata_props[:]  # nothing but the first conv's weight says it is 3
    onnx.save(m, dst)
    return dst


# -- item 7: exit 3 on user input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "decompose", "bench"])
def test_a_dynamic_channel_dimension_is_read_off_the_first_conv(r20, tmp_path, command, capsys):
    dyn = _dynamic_channels(r20, tmp_path / "dynC.onnx")
    if command == "bench":
        args = ["bench", str(dyn), str(r20), "--rounds", "2", "--min-round-ms", "1", "--warmup-ms", "1", "--no-memory"]
    else:
        args = [command, str(dyn), "-o", str(tmp_path / "o.onnx"), "-q"]
    rc, _, err = run(args, capsys)
    assert rc == 0, err


def test_bench_of_models_with_different_inputs_is_a_user_error(lenet, r20, capsys):
    rc, _, err = run(["bench", str(lenet), str(r20), "--rounds", "2"], capsys)
    assert rc == 1
    assert "take different inputs" in one_error(err, rc)


def test_eval_reference_with_another_input_is_a_user_error(lenet, r20, capsys):
    rc, _, err = run(["eval", str(lenet), "--data", "digits", "--samples", "20", "--reference", str(r20)], capsys)
    assert rc == 1
    assert str(r20.name) in one_error(err, rc)


def test_export_opset_99_is_refused_without_dumping_the_torch_ir(tmp_path, capsys):
    rc, out, err = run(["export", "resnet20", "--opset", "99", "-o", str(tmp_path / "x.onnx")], capsys)
    assert rc == 1 and out == ""
    assert "--opset 99" in one_error(err, rc)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "args",
    [
        lambda t: ["report", str(t / "rep.json"), "--plots", str(t / "file.txt")],
        lambda t: ["demo", "--out-dir", str(t / "file.txt"), "--quick"],
        lambda t: ["gate", str(t / "rep.json"), "--summary", str(t / "nodir" / "s.md")],
    ],
    ids=["report-plots-file", "demo-out-dir-file", "gate-summary-no-folder"],
)
def test_a_file_where_a_folder_belongs(tmp_path, args, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "rep.json").write_text(json.dumps(bench_report([(1.0, 0.9, 1.1)])))
    a = args(tmp_path)
    rc, _, err = run(a, capsys)
    assert rc == (2 if a[0] == "gate" else 1)
    line = one_error(err, 1) if a[0] != "gate" else err.strip().splitlines()[0]
    assert "file.txt" in line or "nodir" in line


RECIPES = {
    "passes: 5": "passes must be a list",
    "passes: [prune]\nseed: x": "seed must be an integer",
    "passes: [prune]\ndata: {calib: digits, samples: abc}": "samples must be an integer",
    "passes: [prune]\ndata: {calib: digits, samples: 0}": "samples must be at least 1",
    "passes: [prune]\nthresholds: {max_macs: abc}": "max_macs must be a finite number",
    "passes: [prune]\nthresholds: {max_slowdown: 5x}": "max_slowdown must be a finite number",
    "passes: [prune]\nbench: [1, 2]": "bench must be a mapping",
    "passes: [prune]\nbench: {batch: 0}": "batch must be at least 1",
    "passes: [prune]\nbench: {threads: -1}": "threads must be at least 1",
    "passes: [prune]\nbench: {rounds: 3}\nthresholds: {max_slowdown: 5%}": "needs at least 10 rounds",
    "passes: [{prune: [1]}]": "options must be a mapping",
    "passes: [{prune: {ratio: 0.3, target_macs: 0.5}}]": "not both",
    "passes: [prune]\ndata: 7": "data must be a mapping",
    "passes: [prune]\nthresholds: 7": "thresholds must be a mapping",
    "passes: [prune]\nreport: [1]": "report must be a string",
    "passes: [prune]\ndata: {calib: digits, std: [0]}": "std must be above 0",
}


@pytest.mark.parametrize("body", list(RECIPES), ids=range(len(RECIPES)))
def test_bad_recipes_are_one_line_user_errors(lenet, tmp_path, body, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {lenet}\noutput: o.onnx\n{body}\n")
    rc, _, err = run(["run", str(recipe), "-q"], capsys)
    assert rc == 1
    line = one_error(err, rc)
    assert RECIPES[body] in line and "r.yaml" in line or "pass 'prune'" in line
    assert not (tmp_path / "o.onnx").exists()


def test_a_file_name_that_is_not_utf8(lenet, tmp_path, monkeypatch, capsys):
    src = Path(os.fsdecode(bytes(tmp_path) + b"/l\xff.onnx"))
    src.write_bytes(lenet.read_bytes())
    out = Path(os.fsdecode(bytes(tmp_path) + b"/o\xff.onnx"))
    args = ["prune", str(src), "-o", str(out), "-q"]
    monkeypatch.setattr("sys.argv", ["carve", *args])  # the command line is recorded in the model's metadata
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_huge_batch_is_refused_before_allocating(lenet, capsys):
    rc, _, err = run(["bench", str(lenet), str(lenet), "--batch", "100000000", "--rounds", "2"], capsys)
    assert rc == 1
    assert "--batch 100000000" in one_error(err, rc)


# -- item 8: the gate decides only on reports that can decide ---------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        bench_report([(float("nan"), float("nan"), float("nan"))]),
        bench_report([(float("inf"), 1.0, float("inf"))]),
        bench_report([(0.5, 1.2, 0.4)]),  # inverted interval
        bench_report([(0.5, 0.4, 0.6)], rounds=1),
        bench_report([(0.5, 0.4, 0.6)], rounds=2),
        {**bench_report([(1.0, 0.9, 1.1)]), "schema_version": "1"},
        {**bench_report([(1.0, 0.9, 1.1)]), "schema_version": None},
        {**bench_report([(1.0, 0.9, 1.1)]), "results": {"a": 1}},
        {**bench_report([(1.0, 0.9, 1.1)]), "results": [1, 2]},
        [1, 2, 3],
    ],
    ids=[
        "nan",
        "inf",
        "inverted",
        "rounds-1",
        "rounds-2",
        "version-str",
        "version-null",
        "results-dict",
        "results-ints",
        "not-a-dict",
    ],  # fmt: skip
)
def test_the_gate_refuses_reports_it_cannot_decide_on(tmp_path, doc, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    rc, _, err = run(["gate", str(path)], capsys)
    assert rc == 2, err
    assert "unusable input" in err and "Traceback" not in err


def test_a_baseline_without_speedups_is_unusable(tmp_path, capsys):
    good, base = tmp_path / "g.json", tmp_path / "b.json"
    good.write_text(json.dumps(bench_report([(1.6, 1.5, 1.7)])))
    doc = bench_report([(1.6, 1.5, 1.7)])
    del doc["results"][0]["speedup"]
    base.write_text(json.dumps(doc))
    rc, _, err = run(["gate", str(good), "--baseline", str(base)], capsys)
    assert rc == 2 and "baseline" in err


@pytest.mark.parametrize("flag", [["--max-slowdown", "nan"], ["--min-speedup", "nan"], ["--tolerance", "2"]])
def test_gate_thresholds_must_be_numbers_in_range(tmp_path, flag, capsys):
    good = tmp_path / "g.json"
    good.write_text(json.dumps(bench_report([(1.6, 1.5, 1.7)])))
    rc, _, _ = run(["gate", str(good), *flag], capsys)
    assert rc == 2


def test_bench_with_too_few_rounds_for_the_gate_is_refused_by_the_gate(lenet, tmp_path, simulated_backend, capsys):
    rep = tmp_path / "r.json"
    args = ["bench", str(lenet), str(lenet), "--backend", simulated_backend, "--rounds", "2", "-o", str(rep), "-q"]
    assert run([*args, "--min-round-ms", "1", "--warmup-ms", "1", "--no-memory", "--no-agreement"], capsys)[0] == 0
    rc, _, err = run(["gate", str(rep)], capsys)
    assert rc == 2 and "at least 10" in err


# -- item 9: numbers that make no sense -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "M", "-o", "O", "--ridge", "-1"],
        ["prune", "M", "-o", "O", "--fuse-gate", "nan"],
        ["prune", "M", "-o", "O", "--ratio", "0.3", "--target-macs", "0.5"],
        ["prune", "M", "-o", "O", "--ratio", "0.3", "--target-params", "0.5"],
        ["bench", "M", "M", "--min-round-ms", "-1"],
        ["bench", "M", "M", "--warmup-ms", "-5"],
        ["prune", "M", "-o", "O", "--mean", "nan"],
        ["prune", "M", "-o", "O", "--target-latency", "1e400ms"],
        ["profile", "M", "--min-round-ms", "-1"],
        ["profile", "M", "--min-round-ms", "nan"],
    ],
    ids=[
        "ridge",
        "fuse-gate",
        "ratio+target-macs",
        "ratio+target-params",
        "min-round-ms",
        "warmup-ms",
        "mean",
        "1e400ms",
        "profile-min-round-ms",
        "profile-min-round-ms-nan",
    ],
)
def test_nonsense_numbers_are_usage_errors(lenet, tmp_path, args, capsys):
    args = [str(lenet) if a == "M" else str(tmp_path / "o.onnx") if a == "O" else a for a in args]
    rc, _, err = run(args, capsys)
    assert rc == 2, err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flag", [["--round-to", "1000"], ["--keep-min", "1000"]])
def test_removing_nothing_is_said(lenet, tmp_path, flag, capsys):
    rc, _, err = run(["prune", str(lenet), "-o", str(tmp_path / "o.onnx"), *flag, "-q"], capsys)
    assert rc == 0
    assert "warning: nothing was removed" in err and flag[0] in err


# -- item 10: the ratio printed is what happened ---------------------------------------------------------------------


def test_target_macs_prints_what_was_reached_not_the_default_ratio(r20, tmp_path, capsys):
    rc, out, _ = run(
        ["prune", str(r20), "-o", str(tmp_path / "o.onnx"), "--target-macs", "0.75", "--round-to", "8"], capsys
    )
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("removed"))
    assert "ratio 0.5" not in line
    reached = float(re.search(r"to MACs ([0-9.]+) for target 0.75", line).group(1))
    macs = re.search(r"MACs [0-9,]+ -> [0-9,]+ \(([0-9.]+)%", out).group(1)
    assert abs(reached - float(macs) / 100) < 1e-3


# -- item 15: no test asserts on timing -------------------------------------------------------------------------------


def test_no_test_asserts_on_a_measured_time():
    """Speed-up and latency assertions run on the simulated engine (tests/conftest.py), never on this machine."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        text = path.read_text()
        for m in re.finditer(r"def (test_\w+)\(([^)]*)\):\n((?:    .*\n|\n)*)", text):
            name, params, body = m.groups()
            if "simulated_backend" in params or "simulated" in body:
                continue
            for line in body.splitlines():
                measured = re.search(r'\["speedup"\]\["(median|ci_low|ci_high)"\]|time_ratio\(', line)
                if "assert" not in line or not measured:
                    continue
                # a measured ratio compared with a number other than 0 (> 0 and interval order are always true)
                literal = r"(0\.\d*[1-9]|[1-9][\d.]*)"
                if re.search(rf"[<>]=?\s*{literal}", line) or re.search(rf"{literal}\s*[<>]", line):
                    offenders.append(f"{path.name}::{name}: {line.strip()}")
    assert not offenders, offenders


# -- item 16: progress ------------------------------------------------------------------------------------------------


def test_prune_with_lsq_reports_stages_and_layers_when_piped(r20, tmp_path, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, images=np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8))
    rc, out, err = run(
        ["prune", str(r20), "-o", str(tmp_path / "o.onnx"), "--fuse", "lsq", "--calib", str(calib), "--round-to", "1"],
        capsys,
    )
    assert rc == 0, err
    for stage in ("carve prune: analyse", "carve prune: score and plan", "carve prune: surgery", "carve prune: verify"):
        assert stage in err
    layers = [ln for ln in err.splitlines() if ln.startswith("carve prune: lsq: layer")]
    assert layers and layers[-1].endswith("/19") and layers[-1].split()[-1] == "19/19"
    assert "wrote" in out  # the result still goes to stdout


def test_activation_capture_reports_images(lenet, tmp_path, capsys):
    args = ["prune", str(lenet), "-o", str(tmp_path / "o.onnx"), "--criterion", "hrank", "--calib", "digits"]
    rc, _, err = run([*args, "--samples", "64"], capsys)
    assert rc == 0
    assert "carve prune: capture: images 64/64" in err


def test_quiet_and_json_show_no_progress(lenet, tmp_path, capsys):
    rc, out, err = run(["prune", str(lenet), "-o", str(tmp_path / "o.onnx"), "--json"], capsys)
    assert rc == 0 and err == "" and json.loads(out)["channels_removed"] > 0


def test_bench_reports_rounds(lenet, simulated_backend, capsys):
    args = ["bench", str(lenet), str(lenet), "--backend", simulated_backend, "--rounds", "3", "--no-memory"]
    rc, _, err = run([*args, "--no-agreement", "--min-round-ms", "1", "--warmup-ms", "1"], capsys)
    assert rc == 0
    assert "carve bench: batch 1, 1 thread(s): round 3/3" in err


# -- item 17: recipes resolve against their folder; outputs only under --out-dir --------------------------------------


def test_a_recipe_runs_from_any_folder_and_writes_only_under_out_dir(lenet, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(lenet.read_bytes())
    images, labels = __import__("carve.pipeline.data.datasets", fromlist=["x"]).digits_arrays("train")
    np.savez(folder / "calib.npz", images=images[:64], labels=labels[:64])
    (folder / "r.yaml").write_text(
        "model: m.onnx\noutput: out/carved.onnx\nreport: out/carved.json\n"
        "data: {calib: calib.npz, eval: calib.npz, samples: 32}\npasses: [{prune: {ratio: 0.25, fuse: lsq}}]\n"
    )
    elsewhere, out_dir = tmp_path / "elsewhere", tmp_path / "od"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = sorted(p.name for p in folder.iterdir())
    rc, _, err = run(["run", str(folder / "r.yaml"), "--out-dir", str(out_dir), "-q"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["carved.json", "carved.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == before and not list(elsewhere.iterdir())


def test_recipe_data_under_the_shared_folder(lenet, tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    images, labels = __import__("carve.pipeline.data.datasets", fromlist=["x"]).digits_arrays("train")
    np.savez(shared / "data" / "d.npz", images=images[:64], labels=labels[:64])
    monkeypatch.setenv("CARVE_SHARED", str(shared))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {lenet}\noutput: o.onnx\ndata: {{calib: 'shared:data/d.npz', samples: 32}}\n"
        "passes: [{prune: {ratio: 0.25, fuse: lsq}}]\n"
    )
    rc, _, err = run(["run", str(recipe), "-q"], capsys)
    assert rc == 0, err
    recipe.write_text(recipe.read_text().replace("d.npz", "missing.npz"))
    rc, _, err = run(["run", str(recipe), "-q"], capsys)
    assert rc == 1 and "missing.npz" in one_error(err, rc)


def test_example_recipes_name_shared_data_portably():
    for recipe in (REPO / "examples").glob("*.yaml"):
        assert "../shared" not in recipe.read_text(), recipe.name


@pytest.mark.parametrize(
    "flags",
    [["--crop-pad", "-1"], ["--kd", "nan"], ["--ce", "-1"], ["--momentum", "-0.5"], ["--feature-weight", "inf"]],
)
def test_finetune_refuses_out_of_range_options(lenet, tmp_path, flags, capsys):
    out = tmp_path / "f.onnx"
    rc, _, err = run(["finetune", str(lenet), "-o", str(out), "--data", "digits", "--steps", "1", *flags], capsys)
    assert rc == 1 and flags[0] in one_error(err, rc) and not out.exists()


def test_finetune_never_writes_over_its_teacher_or_data(lenet, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, images=np.zeros((4, 32, 32), np.uint8), labels=np.arange(4))
    before = data.read_bytes(), lenet.read_bytes()
    for out in (lenet, data):
        rc, _, err = run(["finetune", str(lenet), "-o", str(out), "--data", str(data), "--teacher", str(lenet)], capsys)
        assert rc == 1 and "never overwrites its input" in one_error(err, rc)
    assert (data.read_bytes(), lenet.read_bytes()) == before


# -- issue 21, class 5: the quick A/B's word agrees with its numbers --------------------------------------------------


@pytest.mark.parametrize(
    ("a_ms", "b_ms", "lo", "hi", "word"),
    [
        (276.058, 277.707, 0.99, 1.18, "no measurable change"),  # the case: it printed "1.10x faster"
        (10.0, 8.0, 1.1, 1.4, "faster"),
        (10.0, 12.0, 0.7, 0.9, "slower"),
        (10.0, 10.5, 1.02, 1.2, "no measurable change (the medians and the per-round ratios disagree)"),
        (10.0, 9.5, 0.8, 0.95, "no measurable change (the medians and the per-round ratios disagree)"),
        (10.0, 9.0, 0.95, 1.3, "no measurable change"),
    ],
)
def test_the_ab_verdict_agrees_with_the_numbers_it_prints(a_ms, b_ms, lo, hi, word):
    from carve.pipeline.cli.prune import ab_verdict

    assert ab_verdict(a_ms, b_ms, lo, hi) == word


@pytest.mark.parametrize(
    ("passes", "needle"),
    [
        ("[{prune: {criterion: bogus}}]", "unknown criterion 'bogus'"),
        ("[{prune: {criterion_options: {bogus: 1}}}]", "has no option 'bogus'"),
        ("[{finetune: {epochs: .nan}}]", "finite"),
        ("[{prune: {repairs: [glue]}}]", "glue"),
        ("[nosuch]", "unknown pass"),
    ],
)
def test_run_validates_every_pass_before_creating_folders(lenet, tmp_path, capsys, passes, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {lenet}\noutput: sub/dir/o.onnx\npasses: {passes}\n")
    rc, _, err = run(["run", str(recipe)], capsys)
    line = one_error(err, rc)
    assert rc == 1 and needle in line and str(recipe) in line
    assert not (tmp_path / "sub").exists()
