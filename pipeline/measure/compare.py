"""``carve bench``: measure two models side by side on the same engine and write the report (docs/report-schema.md):
latency per configuration (:mod:`carve.pipeline.measure.ab`), memory in fresh processes
(:mod:`carve.pipeline.measure.memory`), agreement (:mod:`carve.pipeline.measure.agreement`), the models' costs, the
environment, and with ``by_op`` each model's kernel time by op type (:mod:`carve.pipeline.measure.op_profile`). The
MAC ratio is reported beside the measured speed-up, with their product, the speed-up efficiency; a MAC ratio is never
called a speed-up."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from carve.pipeline.config import validate
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.history import history, timestamp
from carve.pipeline.graph.io import load
from carve.pipeline.graph.model import Model
from carve.pipeline.measure.ab import measure_pair
from carve.pipeline.measure.agreement import agreement
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.environment import environment
from carve.pipeline.measure.memory import measure_in_fresh_process
from carve.pipeline.progress import Progress
from carve.pipeline.runtime.ort import input_specs

SCHEMA_VERSION = 1


def model_info(path: Path, m: Model | None = None) -> dict:
    m = m if m is not None else load(path)
    c = model_cost(m)
    data = path.read_bytes()
    return {
        "path": str(path),
        "name": path.stem,
        "sha256": hashlib.sha256(data).hexdigest()[:16],
        "onnx_bytes": len(data),
        "weight_bytes": m.weight_bytes(),
        "params": c.params,
        "macs": c.macs,
        "carved": bool(history(m)),
    }


def check_runnable(a: Path, ma: Model, b: Path, mb: Model, batches: list[int]) -> None:
    """Both models run at every batch asked for (a static batch runs only at itself: never measure one batch and
    label it another), take the same inputs, and one input batch fits in memory."""
    for batch in batches:
        specs = {}
        for path, m in ((a, ma), (b, mb)):
            try:
                specs[path] = input_specs(m.proto, batch, strict=True)
            except CarveError as exc:
                raise CarveError(f"{path}: {exc.message} (`batch={batch}`)", hint=exc.hint) from None
        sa, sb = specs[a], specs[b]
        if {k: v[0] for k, v in sa.items()} != {k: v[0] for k, v in sb.items()} or [v[1] for v in sa.values()] != [
            v[1] for v in sb.values()
        ]:
            show = {
                p: ", ".join(f"{n} {'x'.join(map(str, s))} {d}" for n, (s, d) in sp.items()) for p, sp in specs.items()
            }
            raise CarveError(
                f"{a} and {b} take different inputs ({show[a]} vs {show[b]}); a side-by-side measurement needs the "
                "same input for both",
                hint="compare a model with its own pruned / decomposed version",
            )
        need = sum(int(np.prod(s, dtype=np.float64)) * d.itemsize for s, d in sa.values())
        ram = _physical_memory()
        if ram and need > ram / 4:
            raise CarveError(
                f"`batch={batch}`: one input batch of {a} takes {need / 2**30:.3g} GiB, more than a quarter of this "
                f"machine's {ram / 2**30:.3g} GiB",
                hint="use a smaller `batch`",
            )


def _physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def compare(
    a: str | Path,
    b: str | Path,
    cfg: MeasureConfig | None = None,
    *,
    command: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Measure ``b`` against ``a`` (speed-up > 1 means b is faster). Returns the report (schema in docs/)."""
    cfg = cfg or MeasureConfig()
    validate(cfg)
    a, b = Path(a), Path(b)
    for p in (a, b):
        if not p.is_file():
            raise CarveError(f"{p}: no such model file")
    if cfg.by_op and cfg.backend != "ort":
        raise CarveError(
            f"`by_op` uses ONNX Runtime's profiler and needs `backend=ort`, not {cfg.backend!r}",
            hint="measure the op breakdown with the ort backend (its cpu, cuda or tensorrt device)",
        )
    models = {"a": load(a), "b": load(b)}
    check_runnable(a, models["a"], b, models["b"], cfg.batch)
    info = {"a": model_info(a, models["a"]), "b": model_info(b, models["b"])}
    results = []
    for batch in cfg.batch:
        for threads in cfg.threads:
            res = measure_pair(a, b, cfg, batch, threads, progress)
            res["mac_ratio"] = info["b"]["macs"] / info["a"]["macs"] if info["a"]["macs"] else None
            if res["mac_ratio"]:
                res["speedup_efficiency"] = res["speedup"]["median"] * res["mac_ratio"]
            results.append(res)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "carve.bench",
        "created": timestamp(),
        "command": command,
        "environment": environment(cfg),
        "settings": asdict(cfg),
        "models": info,
        "results": results,
    }
    if cfg.memory:
        if progress:
            progress("memory (fresh processes)")
        ec = cfg.engine_config(cfg.batch[0], cfg.threads[0])
        options = {
            "cuda_graphs": ec.cuda_graphs,
            "channels_last": ec.channels_last,
            "compile": ec.compile,
            "provider_options": ec.provider_options,
        }
        report["memory"] = {
            key: {
                str(batch): measure_in_fresh_process(
                    p, cfg.backend, batch, cfg.threads[0], cfg.precision, cfg.device, options=options
                )
                for batch in cfg.batch
            }
            for key, p in (("a", a), ("b", b))
        }
    if cfg.by_op:
        from carve.pipeline.measure.op_profile import op_profile

        if progress:
            progress("time by op type (ONNX Runtime's profiler)")
        ec = cfg.engine_config(cfg.batch[0], cfg.threads[0])
        report["by_op"] = {key: op_profile(p, ec, runs=cfg.rounds) for key, p in (("a", a), ("b", b))}
    if cfg.agreement:
        if progress:
            progress("agreement")
        report["agreement"] = agreement(a, b, cfg, cfg.batch[0])
    return report
