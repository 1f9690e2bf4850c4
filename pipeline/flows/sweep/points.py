"""One point of a sweep: the recipe ``carve run`` would run for it, built (prune, repair, fine-tune, evaluate) and
timed (the final model against the original, as ``carve run`` does), and its record."""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carve.pipeline.errors import CarveError
from carve.pipeline.flows.recipe import Recipe, bench_recipe, run_recipe
from carve.pipeline.flows.sweep.schema import Point, Sweep
from carve.pipeline.graph import load, save


def point_recipe(sweep: Sweep, point: Point, output: Path) -> Recipe:
    """The recipe ``carve run`` would run for this point."""
    prune = {
        "measure": False,  # the sweep times each point itself, under its timing lock; no quick A/B outside it
        **sweep.prune,
        "criterion": point.criterion,
        "allocator": point.allocator,
        point.target.option: point.target.value,
        "repairs": [s.to_json() for s in point.repairs],
    }
    passes: list[tuple[str, dict[str, Any]]] = [("prune", prune)]
    if point.finetune_epochs > 0:
        passes.append(("finetune", {**sweep.finetune, "epochs": point.finetune_epochs}))
    if point.quantize == "int8":  # prune -> repair / fine-tune -> quantize, the order that works
        passes.append(("quantize", dict(sweep.quantize)))
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


def fingerprint(source: str) -> str:
    """What a model or data source holds: the content hash of a file (a model with every external-data file it
    reads); zoo models, ``digits`` and folders as written."""
    from carve.pipeline.files import content_hash
    from carve.pipeline.graph.io import files_read

    text = str(source)
    if text.startswith("shared:"):
        from carve.pipeline.data.shared import shared_file

        found = shared_file(*[p for p in text[len("shared:") :].split("/") if p])
        if found is None:
            return text
        text = str(found)
    path = Path(text)
    if text.startswith(("zoo:", "digits")) or not path.is_file():
        return text
    return "+".join(content_hash(f) for f in files_read(path) if f.is_file())


def config_hash(sweep: Sweep, point: Point) -> str:
    """What decides a point's result: resume reuses a record only when this is unchanged. The model and the data are
    keyed by their content, not their path (issue 21: a model file changed in place is not the same model)."""
    r = point_recipe(sweep, point, Path("x.onnx"))
    data = {k: [v, fingerprint(v)] if k in ("calib", "eval", "train") else v for k, v in r.data.items()}
    doc = {"model": [r.model, fingerprint(r.model)], "passes": r.passes, "data": data, "bench": r.bench, "seed": r.seed}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_points(sweep: Sweep, points: list[Point]) -> None:
    """Validate every point as its run would, before any point runs (docs/sweep.md: validation comes first): each
    pass's options, the criterion and its options, the allocator for the target, the repairs, the fine-tuning
    budget. Each distinct pass configuration is checked once."""
    from carve.pipeline.flows.recipe import check_pass

    seen: set[tuple[str, str]] = set()
    for p in points:
        for name, opts in point_recipe(sweep, p, Path("x.onnx")).passes:
            key = (name, json.dumps(opts, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            try:
                check_pass(name, opts, has_calib="calib" in sweep.data)
            except CarveError as exc:
                raise CarveError(f"{sweep.path}: point {p.id}: {exc.message}", hint=exc.hint) from None


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
        "clock": first["a"].get("engine", {}).get("clock"),
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
