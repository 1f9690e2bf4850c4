"""Running a sweep: :func:`run_sweep` drives any executor, writes each point's model and record the moment it finishes
and ``results.json`` at the end, and skips points already done with the same settings (``--resume``).
:class:`LocalExecutor` is a process pool sized to the machine whose workers take a file lock around measurement
(:func:`timing_lock`), so two points are never timed at the same time on one machine (other points keep pruning
meanwhile). The Ray executor is :class:`carve.pipeline.flows.sweep_ray.RayExecutor`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carve.pipeline.files import atomic_write
from carve.pipeline.flows.sweep.points import build_point, config_hash, record_failed, record_ok, time_point
from carve.pipeline.flows.sweep.results import finish
from carve.pipeline.flows.sweep.schema import Point, Sweep, expand

LOCK_NAME = "carve-sweep-timing.lock"

Finished = Callable[[Point, dict, "bytes | None"], None]
Started = Callable[[Point], None]


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


def _init_worker() -> None:
    # one thread per library in each worker: the pool, not the libraries, uses the cores
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)


def from_threads(v: Any) -> list[int]:
    if isinstance(v, list):
        return [int(x) for x in v] or [1]
    return [int(x) for x in str(v).split(",") if x.strip()] or [1]


@contextlib.contextmanager
def _single_threaded_libraries() -> Iterator[None]:
    """Spawned workers inherit the environment at their start: one thread per numeric library in each."""
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
        n = min(self.size(sweep), len(points))
        if n == 0:
            return
        if self.inline:
            for p in points:
                started(p)
                finished(p, *run_point(sweep, p, self.lock))
            return
        with _single_threaded_libraries():
            self._pool(sweep, points, n, started, finished)

    def _pool(self, sweep: Sweep, points: list[Point], n: int, started: Started, finished: Finished) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

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


def point_path(out_dir: Path, pid: str) -> Path:
    return out_dir / "points" / f"{pid}.json"


def _number(v: Any, *, low: float = float("-inf"), positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= low
    return ok and (v > 0 or not positive)


def record_problem(rec: Any, point: Point) -> str | None:
    """Why a stored record cannot be reused (its schema, checked at the door), or None. A hand-edited or foreign
    record is redone, never trusted into results.json."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if rec.get("id") != point.id:
        return f"its id is {rec.get('id')!r}, not {point.id!r}"
    for key in ("macs_ratio", "params_ratio", "latency_ms_measured", "latency_ms_original", "seconds"):
        if not _number(rec.get(key), low=0, positive=key.startswith("latency")):
            return f"`{key}` is {rec.get(key)!r}, not a finite number"
    sp = rec.get("speedup")
    if not isinstance(sp, dict) or not all(_number(sp.get(k), positive=True) for k in ("median", "ci_low", "ci_high")):
        return "`speedup` needs finite positive median, ci_low and ci_high"
    for key in ("top1", "top1_original", "top1_agreement"):
        v = rec.get(key)
        if v is not None and not (_number(v) and 0 <= v <= 1):
            return f"`{key}` is {v!r}, not a fraction in [0, 1] or null"
    if rec.get("top1") is None and rec.get("top1_agreement") is None:
        return "neither `top1` nor `top1_agreement`"
    if rec.get("model") != f"models/{point.id}.onnx":
        return f"`model` is {rec.get('model')!r}, not models/{point.id}.onnx"
    if not isinstance(rec.get("point"), dict) or not isinstance(rec.get("measured"), str):
        return "`point` or `measured` is missing"
    return None


def done_records(sweep: Sweep, points: list[Point], out_dir: Path) -> dict[str, dict]:
    """Records of points already done with the same settings (``--resume``). Failed points are run again; a record
    whose schema is broken (hand-edited) is run again with a warning."""
    from carve.pipeline.errors import warn

    out: dict[str, dict] = {}
    for p in points:
        f = point_path(out_dir, p.id)
        if not f.is_file():
            continue
        try:
            rec = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            warn(f"{f}: not readable JSON; the point is run again")
            continue
        if not isinstance(rec, dict) or rec.get("status") != "ok" or rec.get("config_hash") != config_hash(sweep, p):
            continue
        problem = record_problem(rec, p)
        if problem:
            warn(f"{f}: {problem}; the point is run again")
        elif (out_dir / rec["model"]).is_file():
            out[p.id] = rec
    return out


def check_outputs(sweep: Sweep, points: list[Point], out_dir: Path) -> None:
    """Before any work: no file the sweep writes (each point's model and record, results.json) is a file it reads
    (the model, e.g. a previous sweep's best under the same --out-dir, its external data, the data, the sweep)."""
    from carve.pipeline.graph.io import check_output_path

    inputs = [sweep.path, None if sweep.model.startswith("zoo:") else sweep.model]
    inputs += [v for k, v in sweep.data.items() if k in ("calib", "eval", "train") and Path(str(v)).exists()]
    outputs = [out_dir / "results.json"]
    for p in points:
        outputs += [out_dir / "models" / f"{p.id}.onnx", point_path(out_dir, p.id)]
    for out in outputs:
        if out.parent.is_dir():  # a folder not made yet holds no input
            check_output_path(out, *inputs)
    (out_dir / "points").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)


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
    points = expand(sweep)
    check_outputs(sweep, points, out_dir)
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
