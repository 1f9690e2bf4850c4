"""Sweeps: a search over pruning settings from one YAML file, run by ``carve sweep SWEEP.yaml --out-dir DIR``.

    name: lenet-sweep
    model: zoo:lenet5              # an ONNX path (relative to this file) or zoo:NAME
    data:                          # as in a recipe (pipeline/flows/recipe.py)
      calib: digits:train
      eval: digits:test
      train: digits:train          # needed when a point fine-tunes
      samples: 256
    axes:                          # every combination is one point
      criterion: [l1, fpgm]
      allocator: [uniform]         # default [uniform]
      target: {kind: macs, values: [0.75, 0.5]}   # kind: macs | params | ratio (fraction removed per layer)
      repair: [none, lsq]          # none | exact | lsq | bias | bn | lsq+bn | lsq+bias | exact+bn | exact+bias
      finetune_epochs: [0, 1]      # 0: no fine-tuning; > 0 appends a `finetune` pass (distillation)
    prune: {round_to: 8}           # options every point's prune pass takes (not the axes)
    finetune: {batch: 32}          # options every fine-tuning point takes (not `epochs`)
    bench: {backend: ort, threads: 1, batch: [1], rounds: 10}   # required: each point is measured
    seed: 0

Each point is a recipe (:class:`carve.pipeline.flows.recipe.Recipe`) with the passes ``prune`` [+ ``finetune``], run by
:func:`carve.pipeline.flows.recipe.run_recipe` and measured by :func:`carve.pipeline.flows.recipe.bench_recipe` exactly
as ``carve run`` does. A point's record is written as soon as it finishes (``points/<id>.json``, atomically, next to its
model ``models/<id>.onnx``); ``results.json`` at the end holds every record with the Pareto-optimal ones marked.

Execution: :func:`run_sweep` takes an executor. :class:`LocalExecutor` is a process pool sized to the machine whose
workers take a file lock around measurement, so two points are never timed at the same time on one machine (other
points keep pruning meanwhile). The Ray executor is in :mod:`carve.pipeline.flows.sweep_ray`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from carve.pipeline.config import from_mapping
from carve.pipeline.errors import CarveError
from carve.pipeline.flows.pareto import mark_pareto
from carve.pipeline.flows.recipe import BENCH_KEYS, DATA_KEYS, Recipe, bench_recipe, run_recipe
from carve.pipeline.graph import atomic_write, load, save

TOP_KEYS = {"name", "model", "data", "axes", "prune", "finetune", "bench", "seed"}
AXIS_KEYS = {"criterion", "allocator", "target", "repair", "finetune_epochs"}
TARGET_KINDS = {"macs": "target_macs", "params": "target_params", "ratio": "ratio"}
REPAIRS = {
    "none": {},
    "exact": {"fuse": "exact"},
    "lsq": {"fuse": "lsq"},
    "bias": {"repair": "bias"},
    "bn": {"repair": "bn"},
    "lsq+bn": {"fuse": "lsq", "repair": "bn"},
    "lsq+bias": {"fuse": "lsq", "repair": "bias"},
    "exact+bn": {"fuse": "exact", "repair": "bn"},
    "exact+bias": {"fuse": "exact", "repair": "bias"},
}
# prune options the axes own: a sweep's `prune:` section may not set them
AXIS_OWNED = {"criterion", "allocator", "ratio", "target_macs", "target_params", "fuse", "repair"}
GPU_BACKENDS = {"trt", "torch-cuda"}
LOCK_NAME = "carve-sweep-timing.lock"


@dataclass
class Sweep:
    path: Path
    model: str  # zoo:NAME or an absolute ONNX path
    axes: dict[str, list[Any]]
    target_kind: str
    data: dict[str, Any] = field(default_factory=dict)  # paths made absolute; digits and shared: as written
    prune: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    name: str = ""

    @property
    def gpu(self) -> bool:
        """Whether points are measured on a GPU (Ray then asks for one per point)."""
        return str(self.bench.get("backend", "ort")) in GPU_BACKENDS or str(self.bench.get("device", "cpu")) == "cuda"


@dataclass(frozen=True)
class Point:
    criterion: str
    allocator: str
    target: float
    repair: str
    finetune_epochs: float
    target_kind: str = "macs"

    @property
    def id(self) -> str:
        ft = f"{self.finetune_epochs:g}"
        parts = [self.criterion, self.allocator, f"{self.target_kind}{self.target:g}", self.repair, f"ft{ft}"]
        return re.sub(r"[^A-Za-z0-9.+=-]+", "_", "-".join(parts))

    def axes(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "allocator": self.allocator,
            "target_kind": self.target_kind,
            "target": self.target,
            "repair": self.repair,
            "finetune_epochs": self.finetune_epochs,
        }


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _as_list(path: Path, key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise CarveError(f"{_where(path, key)}: an axis needs at least one value")
    if len(set(map(str, values))) != len(values):
        raise CarveError(f"{_where(path, key)}: repeated values in {values}")
    return values


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key."""
    from carve.pipeline.measure.config import MeasureConfig
    from carve.pipeline.pruning.allocator import allocators
    from carve.pipeline.pruning.criterion import criteria
    from carve.pipeline.pruning.prune import PruneOptions
    from carve.pipeline.training.finetune import FinetuneOptions

    path = Path(path)
    if not path.is_file():
        raise CarveError(f"{path}: no such sweep file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CarveError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise CarveError(f"{path}: a sweep is a mapping with `model`, `axes` and `bench`")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise CarveError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(TOP_KEYS))}")
    for key in ("model", "axes", "bench"):
        if not doc.get(key):
            raise CarveError(f"{path}: missing `{key}`" + (" (each point is measured)" if key == "bench" else ""))

    axes_doc = doc["axes"]
    if not isinstance(axes_doc, dict):
        raise CarveError(f"{_where(path, 'axes')}: expected a mapping of axis -> values")
    unknown = set(axes_doc) - AXIS_KEYS
    if unknown:
        raise CarveError(
            f"{path}: unknown axis {sorted(unknown)[0]!r}; valid: {', '.join(sorted(AXIS_KEYS))}",
            hint="fixed prune options go into the `prune:` section",
        )
    for key in ("criterion", "target"):
        if key not in axes_doc:
            raise CarveError(f"{path}: missing `axes.{key}`")
    axes: dict[str, list[Any]] = {}
    axes["criterion"] = [str(c) for c in _as_list(path, "axes.criterion", axes_doc["criterion"])]
    for c in axes["criterion"]:
        if c.split("[")[0] not in criteria:
            raise CarveError(f"{path}: axes.criterion: unknown criterion {c!r}; valid: {', '.join(criteria.names())}")
    axes["allocator"] = [str(a) for a in _as_list(path, "axes.allocator", axes_doc.get("allocator", "uniform"))]
    for a in axes["allocator"]:
        if a not in allocators:
            raise CarveError(f"{path}: axes.allocator: unknown allocator {a!r}; valid: {', '.join(allocators.names())}")
    target = axes_doc["target"]
    if not isinstance(target, dict) or set(target) != {"kind", "values"}:
        raise CarveError(f"{path}: axes.target must be {{kind: macs|params|ratio, values: [...]}}")
    kind = str(target["kind"])
    if kind not in TARGET_KINDS:
        raise CarveError(f"{path}: axes.target.kind: unknown kind {kind!r}; valid: {', '.join(TARGET_KINDS)}")
    values = []
    for v in _as_list(path, "axes.target.values", target["values"]):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise CarveError(f"{path}: axes.target.values: not a number: {v!r}") from None
        ok = 0 <= f < 1 if kind == "ratio" else 0 < f <= 1
        if not ok:
            rng = "[0, 1) (the fraction removed)" if kind == "ratio" else "(0, 1] (the fraction kept)"
            raise CarveError(f"{path}: axes.target.values: {v!r} is outside {rng}")
        values.append(f)
    axes["target"] = values
    axes["repair"] = [str(r) for r in _as_list(path, "axes.repair", axes_doc.get("repair", "none"))]
    for r in axes["repair"]:
        if r not in REPAIRS:
            raise CarveError(f"{path}: axes.repair: unknown repair {r!r}; valid: {', '.join(REPAIRS)}")
    epochs = []
    for e in _as_list(path, "axes.finetune_epochs", axes_doc.get("finetune_epochs", 0)):
        try:
            f = float(e)
        except (TypeError, ValueError):
            raise CarveError(f"{path}: axes.finetune_epochs: not a number: {e!r}") from None
        if f < 0:
            raise CarveError(f"{path}: axes.finetune_epochs: {e!r} is negative")
        epochs.append(f)
    axes["finetune_epochs"] = epochs

    data = dict(doc.get("data") or {})
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise CarveError(f"{path}: unknown data key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(DATA_KEYS))}")
    for key in ("calib", "eval", "train"):
        v = data.get(key)
        if v is not None and not str(v).startswith(("digits", "shared:")):  # as written: load_data resolves them
            p = Path(v) if Path(v).is_absolute() else path.parent / v
            data[key] = str(p.resolve())
    if "eval" not in data:
        raise CarveError(f"{path}: missing `data.eval` (each point's accuracy is measured on it)")
    if any(e > 0 for e in epochs) and "train" not in data:
        raise CarveError(f"{path}: axes.finetune_epochs > 0 needs `data.train`")
    if any(r != "none" for r in axes["repair"]) and "calib" not in data:
        raise CarveError(f"{path}: axes.repair needs `data.calib` (repairs use calibration data)")

    prune = dict(doc.get("prune") or {})
    owned = set(prune) & AXIS_OWNED
    if owned:
        raise CarveError(f"{path}: prune.{sorted(owned)[0]} is set by the axes; remove it from `prune:`")
    from_mapping(PruneOptions, prune, where=f"{path}: prune")
    finetune = dict(doc.get("finetune") or {})
    if "epochs" in finetune or "steps" in finetune:
        raise CarveError(f"{path}: finetune.epochs/steps: the fine-tuning budget is the axis `finetune_epochs`")
    from_mapping(FinetuneOptions, finetune, where=f"{path}: finetune")
    bench = dict(doc["bench"])
    bench.setdefault("memory", False)  # memory needs fresh processes per point; ask for it explicitly
    from_mapping(MeasureConfig, bench, where=f"{path}: bench", only=BENCH_KEYS)

    model = str(doc["model"])
    if not model.startswith("zoo:"):
        p = Path(model) if Path(model).is_absolute() else path.parent / model
        if not p.is_file():
            raise CarveError(f"{path}: model: no such file {p}")
        model = str(p.resolve())
    return Sweep(
        path=path.resolve(),
        model=model,
        axes=axes,
        target_kind=kind,
        data=data,
        prune=prune,
        finetune=finetune,
        bench=bench,
        seed=int(doc.get("seed", 0)),
        name=str(doc.get("name") or path.stem),
    )


def expand(sweep: Sweep) -> list[Point]:
    """Every combination of the axes, in the order the file lists them."""
    a = sweep.axes
    return [
        Point(c, al, t, r, e, sweep.target_kind)
        for c, al, t, r, e in itertools.product(
            a["criterion"], a["allocator"], a["target"], a["repair"], a["finetune_epochs"]
        )
    ]


def point_recipe(sweep: Sweep, point: Point, output: Path) -> Recipe:
    """The recipe ``carve run`` would run for this point."""
    prune = {
        "measure": False,  # the sweep times each point itself, under its timing lock; no quick A/B outside it
        **sweep.prune,
        "criterion": point.criterion,
        "allocator": point.allocator,
        TARGET_KINDS[point.target_kind]: point.target,
        **REPAIRS[point.repair],
    }
    passes: list[tuple[str, dict[str, Any]]] = [("prune", prune)]
    if point.finetune_epochs > 0:
        passes.append(("finetune", {**sweep.finetune, "epochs": point.finetune_epochs}))
    return Recipe(
        path=sweep.path,
        model=sweep.model,
        output=output,
        passes=passes,
        data=dict(sweep.data),
        bench=dict(sweep.bench),
        seed=sweep.seed,
        name=point.id,
    )


def config_hash(sweep: Sweep, point: Point) -> str:
    """What decides a point's result: resume reuses a record only when this is unchanged."""
    r = point_recipe(sweep, point, Path("x.onnx"))
    doc = {"model": r.model, "passes": r.passes, "data": r.data, "bench": r.bench, "seed": r.seed}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# one point: build (prune, repair, fine-tune, evaluate) and time (original vs final), as `carve run` does


@dataclass
class Built:
    """A point's models and its run report, as bytes and plain data (so it travels between processes and nodes)."""

    point: Point
    report: dict
    original: bytes
    final: bytes
    seconds: float
    host: str


def build_point(sweep: Sweep, point: Point) -> Built:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="carve-point-") as tmp:
        recipe = point_recipe(sweep, point, Path(tmp) / f"{point.id}.onnx")
        original, final, report = run_recipe(recipe, command=f"carve sweep {sweep.path} (point {point.id})")
        save(final, recipe.output)
        save(original, Path(tmp) / "original.onnx")
        return Built(
            point,
            report,
            (Path(tmp) / "original.onnx").read_bytes(),
            recipe.output.read_bytes(),
            time.perf_counter() - t0,
            socket.gethostname(),
        )


def time_point(sweep: Sweep, built: Built) -> dict:
    """Measure the point's final model against the original (:func:`bench_recipe`); the report's bench sections."""
    with tempfile.TemporaryDirectory(prefix="carve-time-") as tmp:
        a, b = Path(tmp) / "original.onnx", Path(tmp) / f"{built.point.id}.onnx"
        a.write_bytes(built.original)
        b.write_bytes(built.final)
        recipe = point_recipe(sweep, built.point, b)
        original = load(a)
        start = time.time()  # wall clock: the record shows when it was timed (intervals never overlap, tested)
        bench = bench_recipe(recipe, original, b)
        bench["timed"] = [start, time.time()]
        return bench


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, CarveError):
        return str(exc).splitlines()[0]
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def record_ok(sweep: Sweep, built: Built, bench: dict, seconds: float) -> dict:
    """The record of a finished point: its axes, cost, accuracy and the first measured configuration."""
    p, rep = built.point, built.report
    acc = rep.get("accuracy", {})
    fin, orig = acc.get("final", {}), acc.get("original", {})
    first = bench["results"][0]
    compact = {**rep, **{k: v for k, v in bench.items() if k not in ("results", "timed")}}
    compact["results"] = [
        {
            **r,
            "a": {k: v for k, v in r["a"].items() if k != "samples_ms"},
            "b": {k: v for k, v in r["b"].items() if k != "samples_ms"},
        }
        for r in bench["results"]
    ]
    return {
        "id": p.id,
        "point": p.axes(),
        "config_hash": config_hash(sweep, p),
        "status": "ok",
        "error": None,
        "seconds": round(seconds, 2),
        "host": built.host,
        "macs_ratio": rep["cost"]["macs_ratio"],
        "params_ratio": rep["cost"]["params_ratio"],
        "top1": fin.get("top1"),
        "top1_original": orig.get("top1"),
        "top1_agreement": fin.get("reference", {}).get("top1_agreement"),
        "measured": f"{first['backend']} b{first['batch']} t{first['threads']}",
        "latency_ms_measured": first["b"]["median_ms"],
        "latency_ms_original": first["a"]["median_ms"],
        "speedup": {k: first["speedup"][k] for k in ("median", "ci_low", "ci_high")},
        "timed": bench.get("timed"),  # [start, end] of the measurement (Unix time)
        "model": f"models/{p.id}.onnx",
        "report": compact,
    }


def record_failed(sweep: Sweep, point: Point, exc: BaseException | str, seconds: float) -> dict:
    return {
        "id": point.id,
        "point": point.axes(),
        "config_hash": config_hash(sweep, point),
        "status": "failed",
        "error": exc if isinstance(exc, str) else _error_line(exc),
        "seconds": round(seconds, 2),
    }


@contextlib.contextmanager
def timing_lock(path: Path | None = None) -> Iterator[None]:
    """Held while a point is measured: one measurement at a time on this machine (a file lock in the temp folder, so
    it holds across processes and across sweeps)."""
    from filelock import FileLock

    with FileLock(str(path or Path(tempfile.gettempdir()) / LOCK_NAME)):
        yield


def run_point(sweep: Sweep, point: Point, lock: str | None = None) -> tuple[dict, bytes | None]:
    """Build and time one point in this process (the local executor's task). Never raises: a failure is a record."""
    t0 = time.perf_counter()
    try:
        built = build_point(sweep, point)
        with timing_lock(Path(lock) if lock else None):
            bench = time_point(sweep, built)
        return record_ok(sweep, built, bench, time.perf_counter() - t0), built.final
    except Exception as exc:  # a failed point is recorded and the sweep goes on
        if os.environ.get("CARVE_SWEEP_TRACEBACK"):
            traceback.print_exc()
        return record_failed(sweep, point, exc, time.perf_counter() - t0), None


# ---------------------------------------------------------------------------------------------------------------------
# executors and the driver


Finished = Callable[[Point, dict, "bytes | None"], None]
Started = Callable[[Point], None]


def _init_worker() -> None:
    # one thread per library in each worker: the pool, not the libraries, uses the cores
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)


@dataclass
class LocalExecutor:
    """A process pool on this machine, ``workers`` wide (default: the cores this process may use, divided by the
    threads one measurement uses). Measurement takes :func:`timing_lock`."""

    workers: int | None = None
    lock: str | None = None
    inline: bool = False  # run the points one by one in this process (the Python API, tests): no pool start-up

    def size(self, sweep: Sweep) -> int:
        if self.workers:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(from_threads(sweep.bench.get("threads", 1)))
        return max(1, cores // threads)

    def run(self, sweep: Sweep, points: list[Point], started: Started, finished: Finished) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        n = min(self.size(sweep), len(points))
        if n == 0:
            return
        if self.inline:
            for p in points:
                started(p)
                finished(p, *run_point(sweep, p, self.lock))
            return
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # spawned workers inherit the environment at their start
        try:
            ctx = multiprocessing.get_context("spawn")  # torch and ORT thread pools do not survive fork

            def new_pool() -> ProcessPoolExecutor:
                return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker)

            pool = new_pool()
            try:
                queue = list(points)
                running: dict[Any, Point] = {}
                while queue or running:
                    while queue and len(running) < n:  # submit only what runs, so `started` is true
                        p = queue.pop(0)
                        running[pool.submit(run_point, sweep, p, self.lock)] = p
                        started(p)
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    broken = False
                    for fut in done:
                        p = running.pop(fut)
                        try:
                            record, model = fut.result()
                        except BrokenProcessPool as exc:  # a worker died (killed, out of memory, a crash in C)
                            broken = True
                            record, model = record_failed(sweep, p, f"worker process died: {exc}", 0.0), None
                        finished(p, record, model)
                    if broken:  # the points running with it fail too (their futures break); the rest go on
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = new_pool()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def from_threads(v: Any) -> list[int]:
    if isinstance(v, list):
        return [int(x) for x in v] or [1]
    return [int(x) for x in str(v).split(",") if x.strip()] or [1]


def point_path(out_dir: Path, pid: str) -> Path:
    return out_dir / "points" / f"{pid}.json"


def done_records(sweep: Sweep, points: list[Point], out_dir: Path) -> dict[str, dict]:
    """Records of points already done with the same settings (``--resume``). Failed points are run again."""
    out: dict[str, dict] = {}
    for p in points:
        f = point_path(out_dir, p.id)
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # cannot happen with atomic writes, but a hand-edited file is redone, not trusted
        if (
            rec.get("status") == "ok"
            and rec.get("config_hash") == config_hash(sweep, p)
            and (out_dir / rec.get("model", "")).is_file()
        ):
            out[p.id] = rec
    return out


def accuracy_key(records: list[dict]) -> str:
    """top-1 when every finished point has labels to score it, else top-1 agreement with the original."""
    ok = [r for r in records if r.get("status") == "ok"]
    return "top1" if ok and all(r.get("top1") is not None for r in ok) else "top1_agreement"


def finish(sweep: Sweep, records: list[dict], *, command: str | None, executor: str) -> dict:
    """results.json: every record, latency on a common footing, the Pareto front marked."""
    from carve.pipeline.measure.config import MeasureConfig
    from carve.pipeline.measure.environment import environment

    ok = [r for r in records if r["status"] == "ok"]
    # Each point is timed interleaved with the original, so its speed-up is robust to the machine's load changing
    # between points; its latency is stated against one reference: the median of the original's measured latency
    # over all points, divided by the point's speed-up.
    if ok:
        refs = sorted(r["latency_ms_original"] for r in ok)
        ref = refs[len(refs) // 2] if len(refs) % 2 else (refs[len(refs) // 2 - 1] + refs[len(refs) // 2]) / 2
        for r in ok:
            r["latency_ms"] = ref / r["speedup"]["median"]
    else:
        ref = None
    acc = accuracy_key(records)
    front = mark_pareto(records, acc, "latency_ms")
    cfg = from_mapping(MeasureConfig, sweep.bench, where="bench", only=BENCH_KEYS)
    return {
        "schema_version": 1,
        "kind": "carve.sweep",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "sweep": {
            "name": sweep.name,
            "path": str(sweep.path),
            "model": sweep.model,
            "axes": {**sweep.axes, "target_kind": sweep.target_kind},
            "executor": executor,
        },
        "objective": {
            "accuracy": acc,
            "latency": "latency_ms",
            "latency_ms_reference": ref,
            "note": "latency_ms = median original latency over all points / the point's interleaved speed-up",
        },
        "summary": {
            "points": len(records),
            "ok": len(ok),
            "failed": len(records) - len(ok),
            "pareto": front,
        },
        "points": records,
        "environment": environment(cfg),
    }


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    *,
    executor: Any = None,
    resume: bool = False,
    command: str | None = None,
    on_event: Callable[[str, Point, dict | None], None] | None = None,
) -> dict:
    """Run every point not already done, write ``points/<id>.json`` + ``models/<id>.onnx`` as each finishes and
    ``results.json`` at the end. ``on_event(kind, point, record)`` reports "skipped", "started" and "finished"."""
    out_dir = Path(out_dir)
    (out_dir / "points").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    points = expand(sweep)
    executor = executor or LocalExecutor()
    done = done_records(sweep, points, out_dir) if resume else {}
    records: dict[str, dict] = dict(done)
    for p in points:
        if p.id in done and on_event:
            on_event("skipped", p, done[p.id])

    def started(p: Point) -> None:
        if on_event:
            on_event("started", p, None)

    def finished(p: Point, record: dict, model: bytes | None) -> None:
        if model is not None:  # the model first: a record always points at a complete model
            with atomic_write(out_dir / "models" / f"{p.id}.onnx", "wb") as f:
                f.write(model)
        with atomic_write(point_path(out_dir, p.id)) as f:
            json.dump(record, f, indent=1, default=str)
        records[p.id] = record
        if on_event:
            on_event("finished", p, record)

    todo = [p for p in points if p.id not in done]
    executor.run(sweep, todo, started, finished)
    results = finish(
        sweep,
        [records[p.id] for p in points],
        command=command,
        executor=type(executor).__name__.replace("Executor", "").lower(),
    )
    with atomic_write(out_dir / "results.json") as f:
        json.dump(results, f, indent=1, default=str)
    return results
