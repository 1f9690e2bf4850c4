"""The fuzz suite's third family (issue 21): the files users hand carve besides models, each mutated at random and
fed to the command that reads it, held to the same oracle as the other families (:func:`fuzzing.check`: exit 0 with a
verified model or nothing written, or exit 1/2 with one line; never exit 3, a traceback, a changed input, or an output
that is neither the old file nor a verified new one).

Surfaces (:data:`SURFACES`): fine-tuning data (``--data``/``--eval``), fine-tuning checkpoints (``--resume``),
teachers (corrupted models), sweep YAML (random values, alias bombs, huge grids, deep nesting; ``--dry-run``), recipe
YAML (``carve run``), latency tables (``--lut``), gate JSON and report JSON (bench reports, sweep results). Half of
the cases that write a model start with an old output in place, which a failure must leave as it was.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
from fuzzing import CORRUPTIONS, Outcome, check, corrupt
from hypothesis import strategies as st

SURFACES = ["data", "checkpoint", "teacher", "sweep", "recipe", "lut", "gate", "report"]
QUICK = ["--samples", "32", "--epochs", "1", "--batch", "32", "--no-flip", "--threads", "1", "-q"]
_BASE: dict[str, Path] = {}

# values a hand-edit or a hostile file puts where a number, a name or a mapping belongs
ODD = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    1e308,
    -1e-300,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "abc",
    "1e400ms",
    "0.5",
    [],
    [1],
    {},
    {"a": 1},
    [[[[]]]],
    "x" * 300,
]


def base(workdir: Path) -> dict[str, Path]:
    """The valid files every case mutates, made once per process (a model, data, a checkpoint, a table, reports)."""
    if _BASE:
        return _BASE
    from fuzzing import invoke

    from carve import models

    folder = workdir / "base"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model = folder / "l5.onnx"
    models.export("lenet5", model)
    rng = np.random.default_rng(0)
    data = folder / "data.npz"
    np.savez(data, images=rng.integers(0, 256, (64, 32, 32, 1), dtype=np.uint8), labels=np.arange(64) % 10)
    ft = folder / "ft.onnx"
    rc, _, err = invoke(
        [
            "finetune",
            str(model),
            "--teacher",
            str(model),
            "--data",
            str(data),
            *QUICK,
            "--keep-checkpoint",
            "-o",
            str(ft),
        ]
    )
    assert rc == 0, err
    lut = folder / "l5.lut.json"
    rc, _, err = invoke(
        [
            "profile",
            str(model),
            "--rounds",
            "2",
            "--min-round-ms",
            "0.5",
            "--validate",
            "0",
            "--step",
            "32",
            "-o",
            str(lut),
            "-q",
        ]
    )
    assert rc == 0, err
    from conftest import bench_report

    (folder / "bench.json").write_text(json.dumps(bench_report([(1.2, 1.1, 1.3), (0.9, 0.85, 0.95)])))
    from carve.pipeline.flows.sweep import LocalExecutor, load_sweep, run_sweep

    (folder / "s.yaml").write_text(SWEEP.format(model=model))
    run_sweep(load_sweep(folder / "s.yaml"), folder / "sweep", executor=LocalExecutor(inline=True))
    _BASE.update(
        model=model,
        data=data,
        ckpt=folder / "ft.onnx.ckpt",
        lut=lut,
        bench=folder / "bench.json",
        results=folder / "sweep" / "results.json",
    )
    return _BASE


SWEEP = """\
model: {model}
data: {{calib: digits:train, eval: digits:test, samples: 32}}
axes:
  criterion: [l1, fpgm]
  target: {{kind: macs, values: [0.5, 0.8]}}
  allocator: [uniform]
  repair: [none, bn]
prune: {{round_to: 1}}
bench: {{threads: 1, rounds: 3, min_round_ms: 2, warmup_ms: 2}}
seed: 0
"""

RECIPE = {
    "model": "l5.onnx",
    "output": "out.onnx",
    "data": {"calib": "data.npz", "samples": 16},
    "passes": [{"prune": {"ratio": 0.5, "round_to": 1}}],
    "seed": 0,
}


def _paths(doc, prefix=()):
    """Every (path, value) in a JSON-like document."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def mutate_doc(doc, rng: np.random.Generator, *, keep=()):
    """One random edit of a JSON-like document: a value replaced by an odd one, a key removed, or a list emptied."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p, _ in _paths(doc) if p and not any(p[: len(k)] == k for k in keep)]
    if not paths:
        return doc
    path = paths[int(rng.integers(0, len(paths)))]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    what = rng.random()
    if what < 0.2 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = ODD[int(rng.integers(0, len(ODD)))]
    return doc


def _flip(data: bytes, rng) -> bytes:
    b = bytearray(data)
    if rng.random() < 0.3:
        return bytes(b[: int(rng.integers(0, len(b)))])
    for _ in range(int(rng.integers(1, 6))):
        k = int(rng.integers(0, len(b)))
        b[k] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _maybe_old_output(output: Path, model: Path, rng) -> None:
    if rng.random() < 0.5:
        shutil.copy(model, output)  # an old version at -o: a failure leaves it, a success replaces it whole


# -- one case per surface ----------------------------------------------------------------------------------------------


def case_data(b, folder: Path, rng) -> Outcome:
    imgs = np.random.default_rng(int(rng.integers(0, 2**31))).integers(0, 256, (48, 32, 32, 1), dtype=np.uint8)
    labels = np.arange(48) % 10
    kind = int(rng.integers(0, 12))
    arrays = {"images": imgs, "labels": labels}
    if kind == 0:
        arrays["labels"] = np.array([f"c{i}" for i in labels])
    elif kind == 1:
        arrays["images"] = np.array(float(rng.random()))
    elif kind == 2:
        arrays["images"] = np.zeros((4, 0, 0), np.uint8)
    elif kind == 3:
        arrays["images"] = imgs.astype(np.float64) * float(rng.choice([1e39, 1e300, -1e40]))
    elif kind == 4:
        a = imgs.astype(np.float32)
        a.flat[int(rng.integers(0, a.size))] = float(rng.choice([np.nan, np.inf]))
        arrays["images"] = a
    elif kind == 5:
        arrays["labels"] = labels[: int(rng.integers(0, 47))]
    elif kind == 6:
        arrays["labels"] = labels + int(rng.choice([-20, 20, 1000]))
    elif kind == 7:
        arrays["images"] = imgs.reshape(48, -1)
    elif kind == 8:
        arrays["images"] = np.repeat(imgs, int(rng.choice([2, 4])), axis=-1)
    elif kind == 9:
        arrays = {"pixels": imgs}
    elif kind == 10:
        arrays["labels"] = labels.astype(np.float64) + 0.5
    path = folder / "d.npz"
    np.savez(path, **arrays)
    if kind == 11:
        path.write_bytes(_flip(path.read_bytes(), rng))
    model = folder / "l5.onnx"
    shutil.copy(b["model"], model)
    output = folder / "out.onnx"
    _maybe_old_output(output, b["model"], rng)
    flag = str(rng.choice(["--data", "--eval", "--calib", "eval"]))
    if flag == "--calib":
        return check(
            ["prune", str(model), "--calib", str(path), "--ratio", "0.5", "-o", str(output), "-q"], folder, output
        )
    if flag == "eval":
        return check(["eval", str(model), "--data", str(path)], folder, None)
    data = str(path) if flag == "--data" else "digits:train"
    extra = ["--eval", str(path)] if flag == "--eval" else []
    return check(["finetune", str(model), "--data", data, *extra, *QUICK, "-o", str(output)], folder, output)


def case_checkpoint(b, folder: Path, rng) -> Outcome:
    import torch

    model = folder / "l5.onnx"
    shutil.copy(b["model"], model)
    output = folder / "ft.onnx"
    ckpt = folder / "ft.onnx.ckpt"
    if rng.random() < 0.3:
        ckpt.write_bytes(_flip(b["ckpt"].read_bytes(), rng))
    else:
        ck = torch.load(b["ckpt"], weights_only=True)
        name = str(rng.choice(sorted(ck["params"])))
        kind = int(rng.integers(0, 8))
        if kind == 0:
            ck["params"][name] = torch.zeros(1)
        elif kind == 1:
            ck["params"][name] = ck["params"][name].double()
        elif kind == 2:
            del ck["params"][name]
        elif kind == 3:
            ck["params"][name] = ck["params"][name].clone().fill_(float("nan"))
        elif kind == 4:
            ck[str(rng.choice(["epoch", "step", "history", "optimizer", "key", "version"]))] = ODD[
                int(rng.integers(0, 9))
            ]
        elif kind == 5:
            ck["key"][str(rng.choice(["model", "teacher", "data", "options"]))] = "other"
        elif kind == 6:
            ck["params"]["extra"] = torch.zeros(3)
        else:
            ck.pop(str(rng.choice(["params", "optimizer", "epoch"])))
        torch.save(ck, ckpt)
    _maybe_old_output(output, b["model"], rng)
    args = ["finetune", str(model), "--teacher", str(model), "--data", str(b["data"]), *QUICK, "--resume"]
    return check([*args, "-o", str(output)], folder, output, state=ckpt)


def case_teacher(b, folder: Path, rng) -> Outcome:
    model = folder / "l5.onnx"
    shutil.copy(b["model"], model)
    teacher = folder / "t.onnx"
    proto = onnx.load(b["model"])
    teacher.write_bytes(corrupt(proto, str(rng.choice(CORRUPTIONS)), int(rng.integers(0, 2**31))))
    output = folder / "out.onnx"
    _maybe_old_output(output, b["model"], rng)
    args = ["finetune", str(model), "--teacher", str(teacher), "--data", str(b["data"]), *QUICK]
    return check([*args, "-o", str(output)], folder, output)


def _bomb(levels: int, width: int) -> str:
    lines = ["  a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "bombs:\n" + "\n".join(lines) + "\n"


def _yaml_text(doc_text: str, rng, key_for_bomb: str) -> str:
    import yaml

    kind = rng.random()
    if kind < 0.15:
        levels, width = int(rng.integers(4, 11)), int(rng.integers(4, 12))
        return _bomb(levels, width) + doc_text.replace(
            f"{key_for_bomb}:", f"{key_for_bomb}: *a{levels - 1}\nold_{key_for_bomb}:", 1
        )
    if kind < 0.2:
        depth = int(rng.integers(50, 3000))
        return doc_text + f"deep: {'[' * depth}{']' * depth}\n"
    if kind < 0.3:
        return _flip(doc_text.encode(), rng).decode("utf-8", "replace")
    doc = yaml.safe_load(doc_text)
    return yaml.safe_dump(mutate_doc(doc, rng, keep=(("output",), ("name",), ("report",))), default_flow_style=True)


def case_sweep(b, folder: Path, rng) -> Outcome:
    text = SWEEP.format(model=b["model"])
    if rng.random() < 0.15:  # a huge grid: axes multiplied until it must be refused
        n = int(rng.integers(20, 200))
        vals = ", ".join(f"{(i + 1) / (n + 1):.6f}" for i in range(n))
        text = (
            text.replace("values: [0.5, 0.8]", f"values: [{vals}]")
            .replace("criterion: [l1, fpgm]", "criterion: [l1, l2, fpgm, random, slimming]")
            .replace("repair: [none, bn]", "repair: [none, bn, lsq, exact, bias, lsq+bn]")
        )
        text = text.replace(
            "  allocator: [uniform]",
            "  allocator: [uniform, global, dispersion]\n  finetune_epochs: ["
            + ", ".join(str(i) for i in range(int(rng.integers(1, 40))))
            + "]",
        )
        text = text.replace("samples: 32}", "train: digits:train, samples: 32}")
    else:
        text = _yaml_text(text, rng, "name")
    path = folder / "s.yaml"
    path.write_text(text)
    return check(["sweep", str(path), "--out-dir", str(folder / "out"), "--dry-run", "-q"], folder, None)


def case_recipe(b, folder: Path, rng) -> Outcome:
    import yaml

    shutil.copy(b["model"], folder / "l5.onnx")
    shutil.copy(b["data"], folder / "data.npz")
    path = folder / "r.yaml"
    path.write_text(_yaml_text(yaml.safe_dump(RECIPE), rng, "seed"))
    output = folder / "out.onnx"
    _maybe_old_output(output, b["model"], rng)
    return check(["run", str(path), "--report", str(folder / "report.json"), "-q"], folder, output)


def case_lut(b, folder: Path, rng) -> Outcome:
    model = folder / "l5.onnx"
    shutil.copy(b["model"], model)
    lut = folder / "t.lut.json"
    if rng.random() < 0.15:
        lut.write_bytes(_flip(b["lut"].read_bytes(), rng) if rng.random() < 0.5 else b["model"].read_bytes())
    else:
        doc = json.loads(b["lut"].read_text())
        lut.write_text(json.dumps(mutate_doc(doc, rng, keep=(("key", "versions"), ("profile",)))))
    output = folder / "out.onnx"
    _maybe_old_output(output, b["model"], rng)
    args = ["prune", str(model), "--target-latency", "0.9", "--lut", str(lut), "--no-measure", "--refine", "0"]
    return check([*args, "-o", str(output), "-q"], folder, output)


def case_gate(b, folder: Path, rng) -> Outcome:
    rep = folder / "r.json"
    doc = mutate_doc(json.loads(b["bench"].read_text()), rng)
    rep.write_text(json.dumps(doc) if rng.random() > 0.1 else _flip(json.dumps(doc).encode(), rng).decode("latin-1"))
    args = ["gate", str(rep)]
    if rng.random() < 0.3:
        base = folder / "base.json"
        base.write_text(json.dumps(mutate_doc(json.loads(b["bench"].read_text()), rng)))
        args += ["--baseline", str(base)]
    return check(args, folder, None)  # exit 1 is the gate's verdict (a regression): one line too


def case_report(b, folder: Path, rng) -> Outcome:
    src = b["results"] if rng.random() < 0.6 else b["bench"]
    doc = mutate_doc(json.loads(src.read_text()), rng)
    rep = folder / "r.json"
    rep.write_text(json.dumps(doc))
    md = folder / "r.md"
    outcome = check(["report", str(rep), "-o", str(md)], folder, None)
    md.unlink(missing_ok=True)
    return outcome


CASES = {
    "data": case_data,
    "checkpoint": case_checkpoint,
    "teacher": case_teacher,
    "sweep": case_sweep,
    "recipe": case_recipe,
    "lut": case_lut,
    "gate": case_gate,
    "report": case_report,
}


@st.composite
def file_cases(draw) -> tuple[str, int]:
    return draw(st.sampled_from(SURFACES)), draw(st.integers(0, 2**31 - 1))


def run_file_case(surface: str, seed: int, folder: Path, workdir: Path) -> Outcome:
    return CASES[surface](base(workdir), folder, np.random.default_rng(seed))
