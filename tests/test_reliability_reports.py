"""Issue 21, class 4 and 5 on reports: the gate decides only on reports whose configuration and speed-ups are plain
numbers (exit 2 otherwise, as it promises); ``carve report`` checks a sweep's results.json at the door and names the
field of any malformed report instead of an exit 3."""

from __future__ import annotations

import json

import pytest
from conftest import bench_report

from carve.pipeline.cli import main


def _run(args, capsys):
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch", [1]),
        ("threads", {}),
        ("batch", True),
        ("threads", 0),
        ("backend", 5),
        ("speedup", {"median": True, "ci_low": True, "ci_high": True}),
        ("speedup", {"median": "1.2", "ci_low": "1.1", "ci_high": "1.3"}),
        ("speedup", [1.2, 1.1, 1.3]),
    ],
)
@pytest.mark.parametrize("where", ["report", "baseline"])
def test_the_gate_refuses_reports_with_malformed_configurations(tmp_path, capsys, field, value, where):
    good = bench_report([(1.2, 1.1, 1.3)])
    bad = bench_report([(1.2, 1.1, 1.3)])
    bad["results"][0][field] = value
    g, b = tmp_path / "g.json", tmp_path / "b.json"
    g.write_text(json.dumps(good))
    b.write_text(json.dumps(bad))
    args = ["gate", str(b)] if where == "report" else ["gate", str(g), "--baseline", str(b)]
    rc, err = _run(args, capsys)
    assert rc == 2 and "unusable input" in err and "Traceback" not in err and "internal error" not in err, err


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
    from carve.pipeline.flows.sweep import LocalExecutor, load_sweep, run_sweep

    folder = tmp_path_factory.mktemp("sw")
    (folder / "s.yaml").write_text(
        "model: zoo:lenet5\ndata: {calib: digits:train, eval: digits:test, samples: 32}\n"
        "axes: {criterion: [l1], target: {kind: macs, values: [0.5]}}\n"
        "bench: {threads: 1, rounds: 3, min_round_ms: 2, warmup_ms: 2}\n"
    )
    run_sweep(load_sweep(folder / "s.yaml"), folder / "out", executor=LocalExecutor(inline=True))
    return json.loads((folder / "out" / "results.json").read_text())


EDITS = {
    "no model": lambda d: d["sweep"].pop("model"),
    "no sweep": lambda d: d.pop("sweep"),
    "speedup string": lambda d: d["points"][0].update(speedup="fast"),
    "latency missing": lambda d: d["points"][0].pop("latency_ms"),
    "point missing": lambda d: d["points"][0].pop("point"),
    "status odd": lambda d: d["points"][0].update(status="maybe"),
    "points a mapping": lambda d: d.update(points={}),
    "objective odd": lambda d: d["objective"].update(accuracy="vibes"),
    "top1 string": lambda d: d["points"][0].update(top1="high"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_report_of_a_malformed_sweep_results_file_is_one_line(sweep_results, tmp_path, capsys, name):
    doc = json.loads(json.dumps(sweep_results))
    EDITS[name](doc)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    rc, err = _run(["report", str(path), "-o", str(tmp_path / "r.md")], capsys)
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert rc == 1 and len(errors) == 1 and str(path) in errors[0], err
    assert "Traceback" not in err and "internal error" not in err and not (tmp_path / "r.md").exists()


def test_report_of_the_unedited_sweep_results_renders(sweep_results, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(sweep_results))
    rc, err = _run(["report", str(path), "-o", str(tmp_path / "r.md")], capsys)
    assert rc == 0, err and "Pareto" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("edit", ["models-partial", "accuracy-string", "results-none", "speedup-string", "env-list"])
def test_report_of_an_edited_bench_report_is_never_an_internal_error(tmp_path, capsys, edit):
    doc = bench_report([(1.2, 1.1, 1.3)])
    if edit == "models-partial":
        doc["models"] = {"a": {"name": "a"}}
    elif edit == "accuracy-string":
        doc["accuracy"] = "great"
    elif edit == "results-none":
        doc["results"].append(None)
    elif edit == "speedup-string":
        doc["results"][0]["speedup"] = "fast"
    else:
        doc["environment"] = [1, 2]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    rc, err = _run(["report", str(path)], capsys)
    assert rc in (0, 1) and "internal error" not in err and "Traceback" not in err, err
    if rc == 1:
        errors = [ln for ln in err.splitlines() if ": error:" in ln]
        assert len(errors) == 1 and str(path) in errors[0], err
