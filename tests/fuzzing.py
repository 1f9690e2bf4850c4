"""The fuzz suite's cases and its oracle (issue 11), shared by ``tests/test_fuzz.py`` (Hypothesis, at a size CI can
afford) and ``tools/fuzz.py`` (>= 500 cases, its result committed as ``benchmarks/fuzz.json``).

Two families of cases, each a ``carve`` command line run in-process on a file in a scratch folder:

* **pipelines**: a random CNN (:func:`strategies.cnn`) x a random command: ``prune`` (criterion, allocator, ratio or
  MAC/param target, alignment, fusion, repairs, calibration data), ``decompose``, ``merge``, ``sparsify``,
  ``inspect``, or a recipe of random passes;
* **corruptions** of a valid model: byte flips, truncation, removed initializers, initializer shape and type changes,
  input shape changes, attribute mutations, dangling names, removed nodes, unknown op types, wrong opsets, then
  ``inspect`` / ``prune`` / ``decompose`` / ``merge`` on it.

The oracle (:func:`check`): the exit code is 0, 1 or 2 (never 3: a bug); stderr holds no traceback, and for 1 or 2
exactly one ``error:`` line (a hint line and argparse's usage may follow); no input file changed; nothing is written
on failure; a written model passes the full ONNX checker, holds no NaN/Inf weights and runs in ONNX Runtime with finite
outputs. A broken promise raises :class:`BrokenPromise`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from hypothesis import strategies as st
from strategies import cnn

from carve.pipeline.cli import main

INPUT = (8, 8, 3)  # H, W, C of the random CNNs (tests/strategies.py builds 1x3x8x8 inputs)


class BrokenPromise(AssertionError):
    """carve broke one of its reliability guarantees on a fuzz case."""


@dataclass
class Outcome:
    kind: str  # "verified", "user error", "usage error", "unchanged" (inspect and friends: exit 0, nothing written)
    rc: int
    args: list[str]
    message: str = ""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def check_written(path: Path) -> None:
    """A model carve wrote: full checker, finite weights, runs in ONNX Runtime with finite outputs."""
    from carve.pipeline.graph.shapes import concrete_input_shapes
    from carve.pipeline.runtime.ort import session

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    for t in proto.graph.initializer:
        arr = onnx.numpy_helper.to_array(t)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise BrokenPromise(f"{path.name}: initializer {t.name!r} holds NaN/Inf")
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(d) for n, (s, d) in concrete_input_shapes(proto, 2).items()}
    for y in session(path).run(None, feeds):
        if np.issubdtype(np.asarray(y).dtype, np.floating) and not np.isfinite(y).all():
            raise BrokenPromise(f"{path.name}: outputs NaN/Inf on random inputs")


def check(args: list[str], folder: Path, output: Path | None, *, state: Path | None = None) -> Outcome:
    """Run ``carve ARGS`` and hold it to the promises (see the module docstring). ``state`` is a file the command
    both reads and owns (``--resume``'s checkpoint): it may change or go only when the command succeeds."""
    before = {p.name: digest(p) for p in folder.iterdir() if p.is_file() and p != output}
    old = digest(output) if output is not None and output.exists() else None  # an old output: kept, or replaced
    rc, out, err = invoke(args)
    where = f"carve {' '.join(args)}"
    if rc not in (0, 1, 2):
        raise BrokenPromise(f"{where}: exit {rc}\n{err}")
    if "Traceback" in err or "internal error" in err:
        raise BrokenPromise(f"{where}: {err}")
    after = {p.name: digest(p) for p in folder.iterdir() if p.is_file() and p.name in before}
    if state is not None and rc == 0:
        before.pop(state.name, None)
        after.pop(state.name, None)
    if after != before:
        changed = sorted(k for k in before if after.get(k) != before[k])
        raise BrokenPromise(f"{where}: changed its inputs {changed}")
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".carve-")]
    if leftovers:
        raise BrokenPromise(f"{where}: left staging files {leftovers}")
    if args[0] == "gate" and rc in (0, 1):  # the gate's verdict (pass, or a regression: exit 1), printed as a table
        return Outcome("unchanged" if rc == 0 else "verdict", rc, args)
    if rc:
        lines = [ln for ln in err.strip().splitlines() if ln.strip() and ": warning:" not in ln]
        # the gate's unusable input (exit 2) is its own one-line form: `carve gate: unusable input: ...`
        mark = ": unusable input:" if args[0] == "gate" else ": error:"
        errors = [k for k, ln in enumerate(lines) if mark in ln]
        if len(errors) != 1:
            raise BrokenPromise(f"{where}: exit {rc} without exactly one error line:\n{err}")
        head, tail = lines[: errors[0]], lines[errors[0] + 1 :]
        usage = rc == 2 and head and head[0].startswith("usage:")  # argparse prints its usage first
        if (head and not usage) or any(not ln.startswith("  hint:") for ln in tail):
            raise BrokenPromise(f"{where}: exit {rc} with more than one line of error:\n{err}")
        message = lines[errors[0]]
        if output is not None and output.exists() and (old is None or digest(output) != old):
            raise BrokenPromise(f"{where}: exit {rc} but wrote {output.name} (not the old file)")
        return Outcome("usage error" if rc == 2 else "user error", rc, args, message.split(f"{mark} ", 1)[-1])
    if output is None:
        return Outcome("unchanged", rc, args)
    if not output.exists():
        raise BrokenPromise(f"{where}: exit 0 but {output.name} was not written")
    try:
        check_written(output)
    except BrokenPromise:
        raise
    except Exception as exc:
        raise BrokenPromise(f"{where}: exit 0 but the written model is broken: {type(exc).__name__}: {exc}") from None
    return Outcome("verified", rc, args)


# -- pipelines ---------------------------------------------------------------------------------------------------------

CRITERIA = ["l1", "l2", "fpgm", "random", "slimming", "apbm", "simfp", "hrank", "taylor"]


@st.composite
def prune_args(draw) -> list[str]:
    args = ["prune"]
    how = draw(st.sampled_from(["ratio", "target-macs", "target-params", "default"]))
    if how == "ratio":
        args += ["--ratio", f"{draw(st.floats(0, 0.95)):.3f}"]
    elif how != "default":
        args += [f"--{how}", f"{draw(st.floats(0.05, 1.0)):.3f}"]
    args += ["--criterion", draw(st.sampled_from(CRITERIA))]
    args += ["--allocate", draw(st.sampled_from(["uniform", "global", "dispersion"]))]
    args += ["--round-to", str(draw(st.sampled_from([1, 1, 2, 3, 4, 8])))]
    if draw(st.booleans()):
        args += ["--keep-min", str(draw(st.sampled_from([1, 2, 4])))]
    fuse = draw(st.sampled_from([None, None, "exact", "lsq"]))
    if fuse:
        args += ["--fuse", fuse]
    repair = draw(st.sampled_from([None, None, "bias", "bn"]))
    if repair:
        args += ["--repair", repair]
    if draw(st.integers(0, 9)) > 0:  # calibration data most of the time; without it, the error must be clear
        args += ["--calib", "CALIB", "--samples", str(draw(st.sampled_from([4, 16, 33])))]
    if draw(st.integers(0, 9)) == 0:
        args += ["--no-verify"]
    return args


@st.composite
def decompose_args(draw) -> list[str]:
    args = ["decompose"]
    how = draw(st.sampled_from(["energy", "target-macs", "error", "default"]))
    if how == "energy":
        args += ["--energy", f"{draw(st.floats(0.3, 1.0)):.3f}"]
    elif how == "target-macs":
        args += ["--target-macs", f"{draw(st.floats(0.2, 1.0)):.3f}"]
    elif how == "error":
        args += ["--error", f"{draw(st.floats(0.0, 0.5)):.3f}", "--calib", "CALIB", "--samples", "16"]
    args += ["--round-to", str(draw(st.sampled_from([1, 2, 4])))]
    if draw(st.booleans()):
        args += ["--kernels", "spatial"]
    return args


@st.composite
def other_args(draw) -> list[str]:
    kind = draw(st.sampled_from(["merge", "merge-fold", "sparsify", "sparsify-cep", "inspect"]))
    if kind == "merge":
        return ["merge", "--when", draw(st.sampled_from(["always", "macs"]))]
    if kind == "merge-fold":
        return ["merge", "--fold-bn"]
    if kind == "sparsify":
        pattern = draw(st.sampled_from(["unstructured", "2:4"]))
        return ["sparsify", "--sparsity", f"{draw(st.floats(0, 0.95)):.3f}", "--pattern", pattern]
    if kind == "sparsify-cep":
        return ["sparsify", "--criterion", "cep", "--calib", "CALIB", "--samples", "16"]
    return ["inspect", "--groups"]


RECIPE_PASSES = [
    {"prune": {"ratio": 0.3}},
    {"prune": {"target_macs": 0.6, "round_to": 2}},
    {"prune": {"ratio": 0.5, "fuse": "lsq"}},
    {"prune": {"ratio": 0.4, "repair": "bn"}},
    {"decompose": {"energy": 0.9}},
    {"merge": {"when": "macs"}},
    "fold_bn",
    {"sparsify": {"sparsity": 0.5}},
]


@st.composite
def recipe_args(draw) -> list[str]:
    passes = draw(st.lists(st.sampled_from(RECIPE_PASSES), min_size=1, max_size=3))
    return ["run", "RECIPE", json.dumps(passes)]


def commands():
    return st.one_of(prune_args(), decompose_args(), other_args(), recipe_args())


def write_calib(folder: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path = folder / "calib.npz"
    np.savez(path, images=rng.integers(0, 256, (40, *INPUT), dtype=np.uint8), labels=rng.integers(0, 2, 40))
    return path


def run_pipeline(proto: onnx.ModelProto, command: list[str], folder: Path, seed: int = 0) -> Outcome:
    """One random CNN through one command (see :func:`commands`)."""
    model = folder / "in.onnx"
    onnx.save(proto, model)
    calib = write_calib(folder, seed)
    output = folder / "out.onnx"
    if command[0] == "run":
        recipe = folder / "r.yaml"
        doc = {"model": "in.onnx", "output": "out.onnx", "data": {"calib": "calib.npz", "samples": 16}}
        recipe.write_text(json.dumps({**doc, "passes": json.loads(command[2])}))
        return check(["run", str(recipe), "--report", str(folder / "report.json"), "-q"], folder, output)
    args = [command[0], str(model), *[str(calib) if a == "CALIB" else a for a in command[1:]]]
    if command[0] == "inspect":
        return check(args, folder, None)
    return check([*args[:2], "-o", str(output), *args[2:], "-q"], folder, output)


# -- corruptions -------------------------------------------------------------------------------------------------------

CORRUPTIONS = [
    "flip",
    "truncate",
    "drop_initializer",
    "initializer_dims",
    "initializer_dtype",
    "input_dims",
    "attribute",
    "dangling",
    "drop_node",
    "op_type",
    "opset",
    "duplicate_output",
    "input_removed",
]


@st.composite
def corruptions(draw) -> tuple[str, int]:
    return draw(st.sampled_from(CORRUPTIONS)), draw(st.integers(0, 2**31 - 1))


def corrupt_commands():
    return st.sampled_from(["inspect", "prune", "decompose", "merge"])


def corrupt(proto: onnx.ModelProto, kind: str, seed: int) -> bytes:
    """``proto`` damaged as ``kind`` says, as the bytes of a file."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    if kind in ("flip", "truncate"):
        data = bytearray(m.SerializeToString())
        if kind == "truncate":
            return bytes(data[: int(rng.integers(0, len(data)))])
        for _ in range(int(rng.integers(1, 8))):
            k = int(rng.integers(0, len(data)))
            data[k] ^= 1 << int(rng.integers(0, 8))
        return bytes(data)
    if kind == "drop_initializer" and len(g.initializer):
        del g.initializer[int(rng.integers(0, len(g.initializer)))]
    elif kind == "initializer_dims" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        if len(t.dims):
            ax = int(rng.integers(0, len(t.dims)))
            t.dims[ax] = max(0, t.dims[ax] + int(rng.choice([-1, 1, 2])))
    elif kind == "initializer_dtype" and len(g.initializer):
        t = g.initializer[int(rng.integers(0, len(g.initializer)))]
        t.data_type = int(rng.choice([onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, 99]))
    elif kind == "input_dims":
        dims = g.input[0].type.tensor_type.shape.dim
        ax = int(rng.integers(0, len(dims)))
        dims[ax].Clear()
        if rng.random() < 0.5:
            dims[ax].dim_value = int(rng.choice([1, 2, 5, 7]))
        else:
            dims[ax].dim_param = "d"
    elif kind == "attribute":
        nodes = [n for n in g.node if len(n.attribute)]
        if nodes:
            n = nodes[int(rng.integers(0, len(nodes)))]
            a = n.attribute[int(rng.integers(0, len(n.attribute)))]
            if a.type == onnx.AttributeProto.INT:
                a.i = int(rng.choice([-1, 0, 3, 1000]))
            elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                a.ints[int(rng.integers(0, len(a.ints)))] = int(rng.choice([-1, 0, 5, 99]))
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float(rng.choice([np.nan, -1.0, 1e30]))
            else:
                a.name = "bogus"
    elif kind == "dangling" and len(g.node):
        n = g.node[int(rng.integers(0, len(g.node)))]
        if len(n.input):
            n.input[int(rng.integers(0, len(n.input)))] = "nothing_makes_this"
    elif kind == "drop_node" and len(g.node):
        del g.node[int(rng.integers(0, len(g.node)))]
    elif kind == "op_type" and len(g.node):
        g.node[int(rng.integers(0, len(g.node)))].op_type = str(rng.choice(["Bogus", "Conv", "Relu", "Gemm", "Add"]))
    elif kind == "opset":
        m.opset_import[0].version = int(rng.choice([1, 7, 10, 99]))
    elif kind == "duplicate_output" and len(g.node) > 1:
        g.node[int(rng.integers(1, len(g.node)))].output[0] = g.node[0].output[0]
    elif kind == "input_removed":
        del g.input[:]
    return m.SerializeToString()


def run_corruption(proto: onnx.ModelProto, kind: str, seed: int, command: str, folder: Path) -> Outcome:
    model = folder / "in.onnx"
    model.write_bytes(corrupt(proto, kind, seed))
    output = folder / "out.onnx"
    if command == "inspect":
        return check(["inspect", str(model)], folder, None)
    extra = {"prune": ["--ratio", "0.5"], "decompose": ["--energy", "0.9"], "merge": []}[command]
    return check([command, str(model), "-o", str(output), *extra, "-q"], folder, output)


def fresh(folder: Path) -> Path:
    """An empty scratch folder (cases reuse one, so it is emptied first)."""
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


__all__ = ["BrokenPromise", "Outcome", "check", "cnn", "commands", "corruptions", "fresh", "run_corruption"]
