"""Issue 21, class 2 (data loss): every writer leaves the old version or the new one, whole, whatever instant a SIGKILL
strikes; staging clean-up removes only what carve marked as its own.

The model with external data is a pair (``.onnx`` + data file): it is killed before *every* file-system step of the
write (each rename and removal) and after the last; every writer is also killed at random instants
(:data:`RANDOM_KILLS` times each here, 50 times in ``tools/fuzz.py --kills``)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from carve.pipeline.files import MARKER, clean_stale_staging
from carve.pipeline.graph import load, save

REPO = Path(__file__).resolve().parents[1]
RANDOM_KILLS = 5

# A writer run in a child process: writes version NEW over OUT, killing itself before file-system step KILL_AT
# (each os.replace / os.unlink / os.rename of a file outside staging: what a reader of the folder can see), or never
# (-1); prints the number of steps it took.
_CHILD = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {repo!r})
kill_at = {kill_at}
steps = [0]
def counting(real):
    def step(*a, **k):
        path = str(a[-1])
        if os.path.isabs(path) and "/.carve-" not in path and "dir_fd" not in k:
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            steps[0] += 1
        return real(*a, **k)
    return step
from carve.pipeline.graph import load, save
m = load({src!r})
{scale}
os.replace, os.unlink, os.rename = counting(os.replace), counting(os.unlink), counting(os.rename)
save(m, {out!r}, external_data={external})
print(steps[0])
"""

_SCALE = """
import onnx.numpy_helper as nh
for t in m.graph.initializer:
    a = nh.to_array(t)
    if a.dtype.kind == "f" and a.size > 64:
        t.CopyFrom(nh.from_array((a * {factor}).astype(a.dtype), t.name))
"""


def _fingerprint(path: Path) -> bytes:
    """The weights of the model at ``path`` (loaded with its external data, through carve's own checks)."""
    m = load(path)
    return b"".join(m.array(t.name).tobytes() for t in sorted(m.graph.initializer, key=lambda t: t.name))


def _child(src: Path, out: Path, external: bool, kill_at: int, factor: float) -> subprocess.CompletedProcess:
    code = _CHILD.format(
        repo=str(REPO),
        src=str(src),
        out=str(out),
        external=external,
        kill_at=kill_at,
        scale=_SCALE.format(factor=factor),
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _versions(src: Path, tmp: Path, external: bool) -> tuple[bytes, bytes]:
    """The fingerprints of version "old" (weights x1) and "new" (weights x2), written once to compute them."""
    fp = []
    for factor in (1.0, 2.0):
        ref = tmp / f"ref{factor:g}" / "m.onnx"
        ref.parent.mkdir()
        r = _child(src, ref, external, -1, factor)
        assert r.returncode == 0, r.stderr
        fp.append(_fingerprint(ref))
    assert fp[0] != fp[1]
    return fp[0], fp[1]


@pytest.mark.parametrize("external", [True, False], ids=["external-data", "single-file"])
def test_a_kill_before_every_step_of_a_model_write_leaves_the_old_or_the_new_pair(tmp_path, tiny_resnet_onnx, external):
    old_fp, new_fp = _versions(tiny_resnet_onnx, tmp_path, external)
    folder = tmp_path / "w"
    folder.mkdir()
    out = folder / "m.onnx"
    assert _child(tiny_resnet_onnx, out, external, -1, 1.0).returncode == 0
    count = tmp_path / "c" / "m.onnx"  # how many steps a replacement takes (on a copy of the same situation)
    count.parent.mkdir()
    assert _child(tiny_resnet_onnx, count, external, -1, 1.0).returncode == 0
    n = int(_child(tiny_resnet_onnx, count, external, -1, 2.0).stdout)
    assert n >= (3 if external else 1)  # data renamed, model renamed, old data removed
    seen = set()
    for k in range(n + 1):
        before = _fingerprint(out)
        r = _child(tiny_resnet_onnx, out, external, k, 2.0 if before == old_fp else 1.0)
        assert r.returncode == (-signal.SIGKILL if k < n else 0), (k, r.stderr)
        after = _fingerprint(out)  # loads: the model and the data it references are a whole pair
        assert after in (old_fp, new_fp), k
        seen.add("same" if after == before else "switched")
        # nothing but the pair (and a staging folder a kill left) lies in the folder
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".carve-"))
        assert names[0] == "m.onnx" and len(names) <= (3 if external else 1), (k, names)
    assert seen == {"same", "switched"}
    # the next write cleans what the kills left: only the current pair remains
    assert _child(tiny_resnet_onnx, out, external, -1, 1.0).returncode == 0
    left = sorted(p.name for p in folder.iterdir())
    assert left[0] == "m.onnx" and len(left) == (2 if external else 1), left


def test_the_old_pairs_data_is_kept_when_an_input_reads_it(tmp_path, tiny_resnet_onnx):
    """A copy of the model (same data file) is the input: replacing ``out`` must not remove the data it reads."""
    out = tmp_path / "m.onnx"
    save(load(tiny_resnet_onnx), out, external_data=True)
    twin = tmp_path / "twin.onnx"
    twin.write_bytes(out.read_bytes())
    m = load(twin)
    m.proto.graph.initializer[0].name  # noqa: B018 (touch: the model is loaded with its data)
    save(m, out, external_data=True, check_inputs=[twin])
    assert _fingerprint(twin) == _fingerprint(out)


_RANDOM_WRITER = r"""
import sys, time
sys.path.insert(0, {repo!r})
{body}
"""

WRITERS = {
    "model-external": """
from carve.pipeline.graph import load, save
m = load({src!r})
print("ready", flush=True)
for i in range(1000):
    save(m, {out!r}, external_data=True)
""",
    "model": """
from carve.pipeline.graph import load, save
m = load({src!r})
print("ready", flush=True)
for i in range(1000):
    save(m, {out!r}, external_data=False)
""",
    "report": """
import json
from carve.pipeline.graph.io import atomic_write
print("ready", flush=True)
for i in range(100000):
    with atomic_write({out!r}) as f:
        json.dump({{"schema_version": 1, "n": i, "pad": "x" * 200000}}, f)
""",
    "sweep-record": """
import json
from pathlib import Path
from carve.pipeline.files import atomic_write
from carve.pipeline.flows.sweep.executor import point_path
out = Path({out!r})
print("ready", flush=True)
for i in range(100000):
    with atomic_write(out) as f:  # as run_sweep writes points/<id>.json
        json.dump({{"id": "p", "status": "ok", "n": i, "pad": "x" * 200000}}, f)
""",
    "checkpoint": """
import torch
from carve.pipeline.training.finetune import _save_checkpoint, TrainState
class Net:
    params = {{"w": torch.ones(256, 256)}}
class Opt:
    def state_dict(self):
        return {{"state": {{}}, "param_groups": []}}
print("ready", flush=True)
for i in range(100000):
    _save_checkpoint({out!r}, {{"model": "x"}}, Net(), Opt(), TrainState(i, i, []))
""",
}


def _whole(kind: str, out: Path) -> bool:
    """The file at ``out`` is a whole version of what ``kind`` writes."""
    if kind.startswith("model"):
        _fingerprint(out)
        return True
    if kind in ("report", "sweep-record"):
        import json

        doc = json.loads(out.read_text())
        return doc.get("schema_version") == 1 or doc.get("status") == "ok"
    import torch

    return torch.load(out, weights_only=True)["params"]["w"].shape == (256, 256)


def kill_at_random(kind: str, src: Path, folder: Path, rng: random.Random, times: int) -> int:
    """SIGKILL a looping writer of ``kind`` at ``times`` random instants; after each, the file is whole. Returns
    how many kills struck while the file existed (the rest struck before the first write)."""
    out = folder / ("out.onnx" if kind.startswith("model") else f"out.{kind}")
    code = _RANDOM_WRITER.format(repo=str(REPO), body=WRITERS[kind].format(src=str(src), out=str(out)))
    checked = 0
    for _ in range(times):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if out.exists():
            assert _whole(kind, out), kind
            checked += 1
    return checked


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_writer_killed_at_random_instants_leaves_a_whole_file(tmp_path, tiny_resnet_onnx, kind):
    rng = random.Random(21)
    kill_at_random(kind, tiny_resnet_onnx, tmp_path, rng, RANDOM_KILLS)
    # what the kills left in staging is carve's own (marked) and the next clean-up removes all of it
    clean_stale_staging(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".carve-")]


# -- staging: only what carve marked as its own is removed ------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_clean_up_never_removes_a_users_file_of_that_name(tmp_path, tiny_resnet_onnx):
    pid = _dead_pid()
    user_file = tmp_path / f".carve-{pid}-notes.txt"
    user_file.write_text("mine")
    user_dir = tmp_path / f".carve-{pid}-photos"
    user_dir.mkdir()
    (user_dir / "cat.jpg").write_bytes(b"\xff\xd8")
    forged = tmp_path / f".carve-{pid}-forged"
    forged.mkdir()
    (forged / MARKER).write_text("not the right text")
    (forged / "keep").write_text("x")
    link = tmp_path / f".carve-{pid}-link"
    link.symlink_to(user_dir)
    ours = tmp_path / f".carve-{pid}-abc123"
    ours.mkdir()
    (ours / MARKER).write_text(f"carve staging folder {ours.name}\n")
    (ours / "m.onnx").write_bytes(b"half")
    empty = tmp_path / f".carve-{pid}-empty"
    empty.mkdir()
    cut = tmp_path / f".carve-{pid}-cut"  # killed while its marker was written (found by the random-kill test)
    cut.mkdir()
    (cut / MARKER).write_text("carve stag")
    save(load(tiny_resnet_onnx), tmp_path / "q.onnx")
    assert user_file.read_text() == "mine" and (user_dir / "cat.jpg").exists() and (forged / "keep").exists()
    assert link.is_symlink() and not ours.exists() and not empty.exists() and not cut.exists()
    assert clean_stale_staging(tmp_path) == []


def test_written_models_are_unchanged_by_the_pair_scheme(tmp_path, tiny_resnet_onnx):
    """The unique data name is the content's hash: two writes of one model are byte-identical files."""
    a, b = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    a.parent.mkdir()
    b.parent.mkdir()
    m = load(tiny_resnet_onnx)
    save(m, a, external_data=True)
    save(m, b, external_data=True)
    assert a.read_bytes() == b.read_bytes()
    (da,) = a.parent.glob("m.onnx.*.data")
    assert (b.parent / da.name).read_bytes() == da.read_bytes()
    proto = onnx.load(str(a), load_external_data=False)
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} == {da.name}
    assert np.array_equal(load(a).array(m.graph.initializer[0].name), m.array(m.graph.initializer[0].name))
