"""Nothing is lost (issue 11, items 1, 2, 11, 12, 13, 14): an output never lands on a file an input reads (the model,
every file its external data really lives in, reports), staging leaves nothing behind even after a SIGKILL, every
written file respects the umask, external data must lie inside the model's folder, and two runs write the same bytes
under ``SOURCE_DATE_EPOCH``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import onnx
import pytest
from conftest import REPO

from carve.pipeline.cli import main
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import load, save


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def external_model(tmp_path, tiny_resnet_onnx):
    """``a.onnx`` whose weights live in ``b.onnx.data`` (not the conventional ``a.onnx.data``)."""
    proto = onnx.load(tiny_resnet_onnx)
    onnx.save_model(
        proto,
        str(tmp_path / "a.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="b.onnx.data",
        size_threshold=256,
    )
    assert (tmp_path / "b.onnx.data").is_file()
    return tmp_path / "a.onnx"


# -- item 1: the input's actual external-data files ------------------------------------------------------------------


def test_prune_refuses_to_write_over_the_inputs_real_external_data(external_model, capsys):
    folder = external_model.parent
    before = snapshot(folder)
    rc = main(["prune", str(external_model), "-o", str(folder / "b.onnx.data"), "--ratio", "0.5"])
    assert rc == 1
    assert "external data" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_an_output_whose_data_file_would_be_an_input_file_is_refused(external_model, capsys):
    # -o b.onnx would write its weights to b.onnx.data when saved with external data: the input's data file
    folder = external_model.parent
    before = snapshot(folder)
    assert main(["prune", str(external_model), "-o", str(folder / "b.onnx"), "--ratio", "0.5"]) == 1
    assert "b.onnx.data" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_a_hard_link_to_the_external_data_is_refused(external_model):
    folder = external_model.parent
    m = load(external_model)  # (onnx itself refuses to read data files with several links)
    os.link(folder / "b.onnx.data", folder / "link.bin")
    with pytest.raises(CarveError, match="external data"):
        save(m, folder / "link.bin")


def test_writing_next_to_an_external_model_works(external_model):
    m = load(external_model)
    out = save(m, external_model.parent / "c.onnx")
    assert len(list(external_model.parent.glob("c.onnx.*.data"))) == 1  # external stays external
    assert load(out).external_data


# -- item 2: reports over inputs or over the model just written ------------------------------------------------------


def _recipe(tmp_path, **extra) -> str:
    doc = {"model": str(tmp_path / "m.onnx"), "output": "out.onnx", "passes": [{"prune": {"ratio": 0.25}}], **extra}
    (tmp_path / "r.yaml").write_text(json.dumps(doc))
    return str(tmp_path / "r.yaml")


@pytest.fixture
def recipe_dir(tmp_path, tiny_resnet_onnx):
    (tmp_path / "m.onnx").write_bytes(tiny_resnet_onnx.read_bytes())
    return tmp_path


@pytest.mark.parametrize("target", ["m.onnx", "out.onnx", "r.yaml"])
def test_run_report_never_overwrites_the_model_the_recipe_or_the_output(recipe_dir, target, capsys):
    recipe = _recipe(recipe_dir)
    before = snapshot(recipe_dir)
    assert main(["run", recipe, "--report", str(recipe_dir / target), "-q"]) == 1
    err = capsys.readouterr().err
    assert target in err and "Traceback" not in err
    assert snapshot(recipe_dir) == before  # refused before any work: nothing written, nothing changed


@pytest.mark.parametrize("key", [{"report": "m.onnx"}, {"report": "out.onnx"}, {"output": "m.onnx"}])
def test_recipe_report_or_output_equal_to_an_input_is_refused(recipe_dir, key, capsys):
    before = digest(recipe_dir / "m.onnx")
    assert main(["run", _recipe(recipe_dir, **key), "-q"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert digest(recipe_dir / "m.onnx") == before
    assert not (recipe_dir / "out.onnx").exists()


def test_report_output_equal_to_its_input_is_refused(tmp_path, capsys):
    rep = tmp_path / "x.json"
    rep.write_text(json.dumps({"schema_version": 1, "kind": "carve.eval", "accuracy": {"samples": 3}}))
    before = digest(rep)
    assert main(["report", str(rep), "-o", str(rep)]) == 1
    assert "never overwrites its input" in capsys.readouterr().err
    assert digest(rep) == before


def test_gate_summary_never_appends_to_the_report(tmp_path, capsys):
    rep = tmp_path / "x.json"
    speedup = {"median": 1.5, "ci_low": 1.4, "ci_high": 1.6, "round_ratios": [1.5] * 20}
    result = {"backend": "ort", "device": "cpu", "precision": "fp32", "batch": 1, "threads": 1, "rounds": 20}
    rep.write_text(
        json.dumps({"schema_version": 1, "kind": "carve.bench", "results": [{**result, "speedup": speedup}]})
    )
    before = digest(rep)
    assert main(["gate", str(rep), "--summary", str(rep)]) == 2
    assert digest(rep) == before


# -- item 11: external data must lie inside the model's folder (checked by carve, whatever onnx's version) -----------


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_models_folder_is_refused_by_carve(tmp_path, tiny_resnet_onnx, monkeypatch, where):
    folder = tmp_path / "model"
    folder.mkdir()
    proto = onnx.load(tiny_resnet_onnx)
    onnx.save_model(
        proto, str(tmp_path / "x.onnx"), save_as_external_data=True, location="secret.data", size_threshold=256
    )
    proto = onnx.load(tmp_path / "x.onnx", load_external_data=False)
    loc = {"parent": "../secret.data", "absolute": str(tmp_path / "secret.data"), "symlink": "link.data"}[where]
    if where == "symlink":
        (folder / "link.data").symlink_to(tmp_path / "secret.data")
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = loc
    onnx.save_model(proto, str(folder / "m.onnx"))
    # carve's own check, not onnx's (onnx < 1.16 had none): disable onnx's loader entirely
    import onnx.external_data_helper as edh

    monkeypatch.setattr(edh, "load_external_data_for_model", lambda *a, **k: None)
    with pytest.raises(CarveError, match="outside the model's folder"):
        load(folder / "m.onnx")


def test_the_onnx_floor_has_the_external_data_check():
    text = (REPO / "pyproject.toml").read_text()
    assert '"onnx>=1.16' in text


# -- item 13: a SIGKILL during the save leaves nothing behind for long -----------------------------------------------


_KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import carve.pipeline.graph.io as io
from carve.pipeline.graph import load
real = io.os.replace
def die(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
io.os.replace = die
m = load({src!r})
io.save(m, {out!r}, external_data={external})
"""


@pytest.mark.parametrize("external", [False, True])
def test_staging_left_by_a_killed_save_is_cleaned_by_the_next_write(tmp_path, tiny_resnet_onnx, external):
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    code = _KILL_DURING_SAVE.format(repo=str(REPO), src=str(tiny_resnet_onnx), out=str(out), external=external)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in out.parent.iterdir()]
    assert not out.exists() and left and all(n.startswith(".carve-") for n in left)  # the kill left staging
    save(load(tiny_resnet_onnx), out.parent / "q.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx"]


def test_staging_of_a_live_process_is_left_alone(tmp_path, tiny_resnet_onnx):
    live = tmp_path / f".carve-{os.getppid()}-abcdef"
    live.mkdir()
    save(load(tiny_resnet_onnx), tmp_path / "q.onnx")
    assert live.is_dir()


# -- item 14: every file carve writes respects the umask ------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, tiny_resnet_onnx, digits_rgb, umask):
    old = os.umask(umask)
    try:
        m = load(tiny_resnet_onnx)
        save(m, tmp_path / "a.onnx")
        save(m, tmp_path / "b.onnx", external_data=True)
        rep = tmp_path / "r.json"
        rep.write_text(json.dumps({"schema_version": 1, "kind": "carve.eval", "accuracy": {"samples": 3}}))
        assert main(["report", str(rep), "-o", str(tmp_path / "r.md")]) == 0
        data = str(digits_rgb["test"])
        args = ["eval", str(tmp_path / "a.onnx"), "--data", data, "--samples", "4", "-o", str(tmp_path / "e.json")]
        assert main(args) == 0
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    (data,) = tmp_path.glob("b.onnx.*.data")
    for name in ("a.onnx", "b.onnx", data.name, "r.md", "e.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


# -- item 12: SOURCE_DATE_EPOCH makes two runs byte-identical -------------------------------------------------------


def test_two_prunes_are_byte_identical_under_source_date_epoch(tmp_path, tiny_resnet_onnx, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = []
    for k in range(2):
        out = tmp_path / f"p{k}.onnx"
        assert main(["prune", str(tiny_resnet_onnx), "-o", str(out), "--ratio", "0.5", "-q"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    history = json.loads(dict((p.key, p.value) for p in onnx.load_from_string(outs[0]).metadata_props)["carve.history"])
    assert history[-1]["time"] == "2023-11-14T22:13:20Z"


def test_without_source_date_epoch_the_time_is_now(tmp_path, tiny_resnet_onnx, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    out = tmp_path / "p.onnx"
    assert main(["prune", str(tiny_resnet_onnx), "-o", str(out), "--ratio", "0.5", "-q"]) == 0
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["carve.history"])[-1]["time"][:2] == "20"


def test_a_malformed_source_date_epoch_is_a_user_error(tmp_path, tiny_resnet_onnx, monkeypatch, capsys):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert main(["prune", str(tiny_resnet_onnx), "-o", str(tmp_path / "p.onnx"), "-q"]) == 1
    assert "SOURCE_DATE_EPOCH" in capsys.readouterr().err
