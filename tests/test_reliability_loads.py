"""Issue 21, class 1: no code runs from a data file. Every file of user bytes carve reads is read as data only
(``torch.load(weights_only=True)``, numpy ``allow_pickle=False``, ``yaml.safe_load``); a file that holds pickled code
is refused with exit 1 naming it, and the planted payload never runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from carve.pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs ``os.system`` (what a hostile checkpoint does); here it only touches a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _run(args: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line_naming(err: str, path: Path) -> None:
    errors = [ln for ln in err.splitlines() if ": error:" in ln]
    assert len(errors) == 1 and str(path) in errors[0], err
    assert "Traceback" not in err and "internal error" not in err, err


def test_export_weights_with_a_payload_never_run_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.th"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, bad)
    rc, err = _run(["export", "lenet5", "--weights", str(bad), "-o", str(tmp_path / "o.onnx")], capsys)
    assert rc == 1 and not marker.exists(), err
    _one_line_naming(err, bad)
    assert not (tmp_path / "o.onnx").exists()


def test_finetune_resume_checkpoint_with_a_payload_never_runs_it(tmp_path, capsys):
    from carve import models

    marker = tmp_path / "ran"
    src, out = tmp_path / "l5.onnx", tmp_path / "ft.onnx"
    models.export("lenet5", src)
    ckpt = tmp_path / "ft.onnx.ckpt"
    torch.save({"version": 1, "key": {}, "params": {}, "x": _Payload(marker)}, ckpt)
    before = ckpt.read_bytes()
    args = ["finetune", str(src), "--data", "digits:train", "--samples", "64", "--epochs", "1", "--resume"]
    rc, err = _run([*args, "-o", str(out), "-q"], capsys)
    assert rc == 1 and not marker.exists(), err
    _one_line_naming(err, ckpt)
    assert not out.exists() and ckpt.read_bytes() == before


def test_npz_with_pickled_objects_never_runs_them(tmp_path, capsys):
    from carve import models

    marker = tmp_path / "ran"
    src = tmp_path / "l5.onnx"
    models.export("lenet5", src)
    bad = tmp_path / "evil.npz"
    images = np.empty(2, dtype=object)
    images[:] = [_Payload(marker), _Payload(marker)]
    np.savez(bad, images=images, labels=np.zeros(2, np.int64))
    rc, err = _run(["prune", str(src), "--calib", str(bad), "-o", str(tmp_path / "o.onnx"), "-q"], capsys)
    assert rc == 1 and not marker.exists(), err
    _one_line_naming(err, bad)


def test_every_load_of_user_bytes_in_the_source_is_data_only():
    """A static check over the package: no pickle, no yaml.load, every torch.load/np.load data-only."""
    bad = []
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("plugins/**/*.py"), *REPO.glob("models/**/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\byaml\.(load|unsafe_load|full_load)\(|\bmarshal\.loads?\(", code):
                bad.append(f"{path.relative_to(REPO)}:{n}")
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                bad.append(f"{path.relative_to(REPO)}:{n}")
            if re.search(r"np\.load\(", code) and "allow_pickle=False" not in code:
                bad.append(f"{path.relative_to(REPO)}:{n}")
    assert not bad, bad


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['touch {m}']", "x: !!python/name:os.system"])
def test_yaml_tags_that_would_run_code_are_refused(tmp_path, capsys, text):
    marker = tmp_path / "ran"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.format(m=marker) + "\n")
    rc, err = _run(["run", str(recipe), "--out-dir", str(tmp_path / "out")], capsys)
    assert rc == 1 and not marker.exists(), err
    _one_line_naming(err, recipe)


@pytest.mark.parametrize(
    ("images", "labels", "needle"),
    [
        (np.zeros((4, 8, 8), np.uint8), np.array(["cat", "dog", "cat", "dog"]), "labels must be class numbers"),
        (np.array(3.0), None, "images must be"),
        (np.zeros((4, 0, 0), np.uint8), np.zeros(4, np.int64), "hold no pixels"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0.5, 1, 0, 1]), "whole class numbers"),
        (np.array(["a", "b"]), None, "images must be numbers"),
    ],
    ids=["string-labels", "0-d-images", "0x0-images", "fractional-labels", "string-images"],
)
def test_data_files_get_a_schema_check_at_the_door(tmp_path, capsys, images, labels, needle):
    """Issue 21, class 4: string labels, a 0-d image array, 0x0 images were exit 3."""
    from carve import models

    src = tmp_path / "l5.onnx"
    models.export("lenet5", src)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=images, **({} if labels is None else {"labels": labels}))
    for cmd in (["prune", str(src), "--calib", str(bad)], ["finetune", str(src), "--data", str(bad)]):
        rc, err = _run([*cmd, "-o", str(tmp_path / "o.onnx"), "-q"], capsys)
        assert rc == 1 and needle in err, err
        _one_line_naming(err, bad)
        assert not (tmp_path / "o.onnx").exists()


def test_export_never_writes_over_its_weights_file(tmp_path, capsys):
    """Issue 21, class 2: every file a command reads is an input of the output check (here `--weights`)."""
    from carve.models import build

    w = tmp_path / "w.th"
    torch.save({"state_dict": build("lenet5").state_dict()}, w)
    before = w.read_bytes()
    rc, err = _run(["export", "lenet5", "--weights", str(w), "-o", str(w)], capsys)
    assert rc == 1 and "never overwrites its input" in err and w.read_bytes() == before, err
