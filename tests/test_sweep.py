"""Sweeps: recipe validation, expansion, Pareto marking on hand-made points, per-point records, resume, failure
isolation, the report, the README's example sweep through the CLI, and Ray against the local executor."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.flows.pareto import dominates, mark_pareto, pareto_ids
from carve.pipeline.flows.sweep import LocalExecutor, config_hash, expand, load_sweep, run_sweep

# a tiny sweep: 2 criteria x 2 MAC targets (one impossible) = 4 points, short measurements
TINY = """\
name: tiny
model: zoo:lenet5
data: {calib: digits:train, eval: digits:test, samples: 64}
axes:
  criterion: [l1, fpgm]
  target: {kind: macs, values: [0.5, 0.0001]}
prune: {round_to: 1}
bench: {threads: 1, rounds: 3, min_round_ms: 5, warmup_ms: 10}
"""


def write(tmp_path, text: str, name: str = "s.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "edit, message",
    [
        (("name: tiny", "colour: red"), "unknown key 'colour'"),
        (("  criterion: [l1, fpgm]", "  criterion: [l1, nosuch]"), "axes.criterion: unknown criterion 'nosuch'"),
        (("  criterion: [l1, fpgm]", "  criterion: [l1, l1]"), "axes.criterion: repeated values"),
        (("  criterion: [l1, fpgm]", "  criterion: [l1]\n  width: [1]"), "axes: unknown key 'width'"),
        (("kind: macs", "kind: flops"), "axes.target: kind must be one of macs, params, ratio; got 'flops'"),
        (("values: [0.5, 0.0001]", "values: [0.5, 1.5]"), "axes.target.values: `target_macs` is the fraction"),
        (("values: [0.5, 0.0001]", "values: []"), "axes.target.values: an axis needs at least one value"),
        (("values: [0.5, 0.0001]", "values: [half]"), "axes.target: values must be a finite number, got 'half'"),
        (("bench: {threads: 1,", "prune: {criterion: l1}\nbench: {threads: 1,"), "prune.criterion is set by the axes"),
        (("bench: {threads: 1,", "prune: {round_too: 8}\nbench: {threads: 1,"), "round_too"),
        (("bench: {threads: 1,", "bench: {threadz: 1,"), "threadz"),
        (("data: {calib: digits:train, eval: digits:test,", "data: {calib: digits:train,"), "missing `data.eval`"),
        (("  target:", "  repair: [none, glue]\n  target:"), "axes.repair: unknown repair 'glue'"),
        (("  target:", "  finetune_epochs: [0, 1]\n  target:"), "finetune_epochs > 0 needs `data.train`"),
        (("  target:", "  finetune_epochs: [-1]\n  target:"), "axes: finetune_epochs must be at least 0"),
        (("  target:", "  repair: [none, [lsq, {bn: {bogus: 1}}]]\n  target:"), "repair 'bn' has no option 'bogus'"),
        (("  target:", "  repair: [lsq, lsq]\n  target:"), "axes.repair: repeated values"),
        (("  target:", "  quantize: [none, fp8]\n  target:"), "axes.quantize: 'fp8' is not one of none, int8"),
        (
            (
                "data: {calib: digits:train, eval: digits:test, samples: 64}\naxes:",
                "data: {eval: digits:test}\naxes:\n  quantize: [int8]",
            ),
            "int8 needs `data.calib`",
        ),
        (("prune: {round_to: 1}", "prune: {round_to: 1}\nquantize: {method: nosuch}"), "quantize: `method` must be"),
    ],
)
def test_invalid_sweeps_name_the_key(tmp_path, edit, message):
    old, new = edit
    assert old in TINY
    p = write(tmp_path, TINY.replace(old, new))
    with pytest.raises(CarveError) as err:
        load_sweep(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_missing_bench_and_missing_file(tmp_path):
    p = write(tmp_path, TINY.split("bench:")[0])
    with pytest.raises(CarveError, match="missing `bench`"):
        load_sweep(p)
    with pytest.raises(CarveError, match="no such sweep file"):
        load_sweep(tmp_path / "nope.yaml")
    p = write(tmp_path, TINY.replace("zoo:lenet5", "missing.onnx"))
    with pytest.raises(CarveError, match="model: no such file"):
        load_sweep(p)


def test_cli_refuses_a_bad_sweep_with_exit_1(tmp_path, capsys):
    p = write(tmp_path, TINY.replace("kind: macs", "kind: flops"))
    assert main(["sweep", str(p), "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "axes.target: kind" in err and "Traceback" not in err


def test_expand_is_the_product_of_the_axes_with_unique_ids(tmp_path):
    p = write(
        tmp_path,
        TINY.replace("  target:", "  repair: [none, lsq, lsq+bn]\n  allocator: [uniform, global]\n  target:"),
    )
    sweep = load_sweep(p)
    points = expand(sweep)
    assert len(points) == 2 * 2 * 3 * 2
    assert len({p.id for p in points}) == len(points)
    assert {p.repair for p in points} == {"none", "lsq", "lsq+bn"}
    # the recipe of a point is what `carve run` would get
    from carve.pipeline.flows.sweep import point_recipe

    pt = next(p for p in points if p.repair == "lsq+bn" and p.allocator == "global")
    (name, opts), *rest = point_recipe(sweep, pt, tmp_path / "x.onnx").passes
    assert name == "prune" and not rest
    assert opts["repairs"] == ["lsq", "bn"] and opts["allocator"] == "global"
    assert opts["target_macs"] == pt.target.value
    assert config_hash(sweep, pt) != config_hash(sweep, points[0])


def test_dry_run_lists_the_points(tmp_path, capsys):
    assert main(["sweep", str(write(tmp_path, TINY)), "--out-dir", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 points" in out and "fpgm-uniform-macs0.5-none-ft0" in out


# ---------------------------------------------------------------------------------------------------------------------
# Pareto marking on hand-made points


def pt(pid, acc, lat, **kw):
    return {"id": pid, "top1": acc, "latency_ms": lat, **kw}


def test_dominance():
    assert dominates((0.9, 1.0), (0.8, 1.0))
    assert dominates((0.9, 1.0), (0.9, 2.0))
    assert not dominates((0.9, 1.0), (0.9, 1.0))  # equal: neither beats the other
    assert not dominates((0.9, 2.0), (0.8, 1.0))  # a trade-off


def test_pareto_marks_exactly_the_undominated_points():
    points = [
        pt("fast", 0.80, 1.0),
        pt("mid", 0.90, 2.0),
        pt("dominated", 0.85, 2.5),  # mid is more accurate and faster
        pt("accurate", 0.95, 4.0),
        pt("slow-equal", 0.95, 5.0),  # as accurate as `accurate`, slower
        pt("twin", 0.90, 2.0),  # identical to mid: both stay
        pt("failed", None, None, status="failed"),
        pt("unmeasured", 0.99, None),
    ]
    front = mark_pareto(points, "top1", "latency_ms")
    assert front == ["fast", "mid", "twin", "accurate"]
    marked = {p["id"] for p in points if p["pareto"]}
    assert marked == {"fast", "mid", "twin", "accurate"}
    assert pareto_ids([], "top1", "latency_ms") == []


# ---------------------------------------------------------------------------------------------------------------------
# running: records, failure isolation, resume, report


def test_sweep_records_points_isolates_failures_and_resumes(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY))
    out = tmp_path / "out"
    events = []
    results = run_sweep(sweep, out, executor=LocalExecutor(inline=True), on_event=lambda k, p, r: events.append(k))
    s = results["summary"]
    assert (s["points"], s["ok"], s["failed"]) == (4, 2, 2)
    assert events.count("started") == 4 and events.count("finished") == 4
    for rec in results["points"]:
        on_disk = json.loads((out / "points" / f"{rec['id']}.json").read_text())
        assert on_disk["status"] == rec["status"]
        if rec["status"] == "failed":
            # the impossible target fails with the planner's one-line error; the sweep went on
            assert "cannot reach macs 0.0001" in rec["error"] and "\n" not in rec["error"]
            assert not (out / "models" / f"{rec['id']}.onnx").exists()
        else:
            assert (out / rec["model"]).is_file()
            assert rec["macs_ratio"] <= 0.5 + 1e-9 and 0.5 < rec["top1"] <= 1
            assert rec["speedup"]["ci_low"] <= rec["speedup"]["median"] <= rec["speedup"]["ci_high"]
            assert rec["latency_ms"] > 0 and rec["latency_ms_measured"] > 0
    ok = [r for r in results["points"] if r["status"] == "ok"]
    assert s["pareto"] == pareto_ids(ok, "top1", "latency_ms") and s["pareto"]
    assert json.loads((out / "results.json").read_text())["summary"] == s

    # --resume: done points are skipped (their records untouched), failed ones run again
    stamps = {r["id"]: (out / "points" / f"{r['id']}.json").stat().st_mtime_ns for r in ok}
    events.clear()
    again = run_sweep(
        sweep, out, executor=LocalExecutor(inline=True), resume=True, on_event=lambda k, p, r: events.append((k, p.id))
    )
    assert sorted(pid for k, pid in events if k == "skipped") == sorted(stamps)
    assert sorted(pid for k, pid in events if k == "started") == sorted(
        r["id"] for r in results["points"] if r["status"] == "failed"
    )
    assert {r["id"]: (out / "points" / f"{r['id']}.json").stat().st_mtime_ns for r in ok} == stamps
    assert [r.get("top1") for r in again["points"]] == [r.get("top1") for r in results["points"]]

    # a changed setting changes the points' hash: nothing is reused
    changed = load_sweep(write(tmp_path, TINY.replace("rounds: 3", "rounds: 4"), "s2.yaml"))
    events.clear()
    run_sweep(changed, out, executor=LocalExecutor(inline=True), resume=True, on_event=lambda k, p, r: events.append(k))
    assert "skipped" not in events and events.count("started") == 4

    # the report: a table with the front marked and the Pareto plot
    md, plots = tmp_path / "sweep.md", tmp_path / "plots"
    assert main(["report", str(out / "results.json"), "-o", str(md), "--plots", str(plots)]) == 0
    text = md.read_text()
    front = json.loads((out / "results.json").read_text())["summary"]["pareto"]
    for pid in front:
        assert any(line.startswith("| **\\***") and f"`{pid}`" in line for line in text.splitlines())
    assert "## Failed points" in text and "cannot reach" in text
    assert (plots / "pareto.png").stat().st_size > 1000 and "pareto.png" in text


def test_a_fine_tuning_point_runs_prune_then_finetune(tmp_path):
    text = TINY.replace("criterion: [l1, fpgm]", "criterion: [l1]").replace("values: [0.5, 0.0001]", "values: [0.5]")
    text = text.replace("samples: 64}", "train: digits:train, samples: 64}")
    text = text.replace("  target:", "  finetune_epochs: [1]\n  target:") + "finetune: {batch: 32, flip: false}\n"
    sweep = load_sweep(write(tmp_path, text))
    (rec,) = run_sweep(sweep, tmp_path / "out", executor=LocalExecutor(inline=True))["points"]
    assert rec["status"] == "ok", rec.get("error")
    assert rec["id"] == "l1-uniform-macs0.5-none-ft1"
    assert [p["pass"] for p in rec["report"]["passes"]] == ["prune", "finetune"]
    assert rec["macs_ratio"] <= 0.5 + 1e-9 and rec["pareto"] is True  # the only point is on the front


def test_the_quantize_axis_spans_precision(tmp_path):
    """`quantize: [none, int8]`: the same pruned point in FP32 and INT8 (a quantize pass last), both timed against the
    FP32 original, both in the Pareto computation; the report says which precision each row is."""
    text = TINY.replace("criterion: [l1, fpgm]", "criterion: [l1]").replace("values: [0.5, 0.0001]", "values: [0.5]")
    text = text.replace("  target:", "  quantize: [none, int8]\n  target:")
    sweep = load_sweep(write(tmp_path, text))
    assert [p.id for p in expand(sweep)] == ["l1-uniform-macs0.5-none-ft0", "l1-uniform-macs0.5-none-ft0-int8"]
    results = run_sweep(sweep, tmp_path / "out", executor=LocalExecutor(inline=True))
    fp32, int8 = results["points"]
    assert fp32["status"] == int8["status"] == "ok", (fp32.get("error"), int8.get("error"))
    assert [p["pass"] for p in int8["report"]["passes"]] == ["prune", "quantize"]
    assert [p["pass"] for p in fp32["report"]["passes"]] == ["prune"]
    assert int8["point"]["quantize"] == "int8" and int8["top1"] > 0.5
    assert results["summary"]["pareto"]
    md = tmp_path / "sweep.md"
    assert main(["report", str(tmp_path / "out" / "results.json"), "-o", str(md)]) == 0
    rows = [line for line in md.read_text().splitlines() if "`l1-uniform" in line]
    assert sorted(" INT8 " in r for r in rows) == [False, True]


def test_report_refuses_a_sweep_merged_with_other_reports(tmp_path, capsys):
    doc = {"schema_version": 1, "kind": "carve.sweep"}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert main(["report", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 1
    assert "rendered on its own" in capsys.readouterr().err


def readme_sweep_block() -> list[str]:
    import re

    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    block = next(b for b in blocks if b.startswith("carve sweep"))
    return [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.strip()]


def test_the_readme_sweep_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's sweep block as CI runs it: the LeNet/digits sweep in the process pool, its report, a resume that
    redoes nothing; the ResNet-56 line is a valid command on a valid sweep file (it needs ../shared and a cluster)."""
    import shlex

    from carve.pipeline.cli import build_parser

    monkeypatch.chdir(tmp_path)
    lines = readme_sweep_block()
    assert any("--resume" in ln for ln in lines) and any("--ray" in ln for ln in lines)
    for line in lines:
        args = shlex.split(line.replace("examples/", str(REPO / "examples") + "/"))
        assert args[0] == "carve"
        if "resnet56" in line:
            build_parser().parse_args(args[1:])
            assert len(expand(load_sweep(args[2]))) == 24
            continue
        before = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "points").glob("*.json")}
        assert main(args[1:]) == 0, line
        if args[1] == "sweep":  # the path as a user would type it (`--out-dir sweep/` once printed sweep//results.json)
            assert f"wrote {Path('sweep') / 'results.json'} (carve report" in capsys.readouterr().out
        if "--resume" in line:
            after = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "points").glob("*.json")}
            assert after == before and len(after) == 8  # nothing redone
    doc = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert doc["summary"]["ok"] == 8 and doc["summary"]["failed"] == 0
    assert doc["sweep"]["executor"] == "local"
    # two workers, and the timing lock: no two measurements overlapped in time
    spans = sorted(p["timed"] for p in doc["points"])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert len({p["host"] for p in doc["points"]}) == 1
    assert (tmp_path / "sweep.md").is_file() and (tmp_path / "plots" / "pareto.png").is_file()
    # lsq refits from calibration data: not worse than plain pruning at the same point on held-out digits (1% slack)
    by_id = {p["id"]: p for p in doc["points"]}
    for pid, p in by_id.items():
        if "-lsq-" in pid:
            assert p["top1"] >= by_id[pid.replace("-lsq-", "-none-")]["top1"] - 0.01


def test_a_killed_worker_fails_its_point_and_the_sweep_goes_on(tmp_path):
    """SIGKILL one pool worker while the first points run: those points are recorded as failed with the reason, a new
    pool runs the rest, results.json is written."""
    import multiprocessing
    import os
    import signal

    sweep = load_sweep(write(tmp_path, TINY.replace("values: [0.5, 0.0001]", "values: [0.75, 0.5]")))
    killed = []

    def on_event(kind, p, rec):
        if kind == "started" and not killed:
            import time

            deadline = time.time() + 60
            while not multiprocessing.active_children() and time.time() < deadline:
                time.sleep(0.05)
            victim = multiprocessing.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    results = run_sweep(sweep, tmp_path / "out", executor=LocalExecutor(workers=1), on_event=on_event)
    assert killed
    statuses = {p["id"]: p["status"] for p in results["points"]}
    failed = [p for p in results["points"] if p["status"] == "failed"]
    assert failed and all("worker process died" in p["error"] for p in failed)
    assert len(failed) < len(statuses) and results["summary"]["ok"] == len(statuses) - len(failed)
    assert (tmp_path / "out" / "results.json").is_file()


def test_ray_flag_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["sweep", str(write(tmp_path, TINY)), "--out-dir", str(tmp_path / "o"), "--ray", "auto"]) == 1
    err = capsys.readouterr().err
    assert 'pip install "carve[ray]"' in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_ray_cluster_gives_the_local_results(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'carve[ray]')")
    from carve.pipeline.flows.sweep_ray import RayExecutor

    sweep = load_sweep(write(tmp_path, TINY))
    local = run_sweep(sweep, tmp_path / "local", executor=LocalExecutor(inline=True))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(sweep, tmp_path / "ray", executor=RayExecutor())
    finally:
        ray.shutdown()
    assert remote["sweep"]["executor"] == "ray"
    spans = sorted(p["timed"] for p in remote["points"] if p["status"] == "ok")  # one timing actor: never overlapping
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    keys = ("id", "status", "error", "macs_ratio", "params_ratio", "top1", "top1_agreement", "config_hash")
    assert [{k: p.get(k) for k in keys} for p in remote["points"]] == [
        {k: p.get(k) for k in keys} for p in local["points"]
    ]
    import onnx

    for p in remote["points"]:  # the models came back to the driver and are the local ones (history times aside)
        if p["status"] == "ok":
            a, b = (onnx.load(str(tmp_path / d / p["model"])) for d in ("ray", "local"))
            assert a.graph.SerializeToString() == b.graph.SerializeToString()


def test_the_resnet56_example_sweep_is_valid_and_names_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CARVE_SHARED", str(tmp_path))  # validation must not need the data itself
    sweep = load_sweep(REPO / "examples" / "resnet56_sweep.yaml")
    assert len(expand(sweep)) == 24
    assert all(str(sweep.data[k]).startswith("shared:") for k in ("calib", "train", "eval"))
