"""``carve bench``: measure two models side by side on the same engine and write the report (docs/report-schema.md):
latency per configuration (:mod:`pipeline.measure.ab`), memory in fresh processes (:mod:`pipeline.measure.memory`),
agreement (:mod:`pipeline.measure.agreement`), the models' costs, and the environment. The MAC ratio is reported
beside the measured speed-up, with their product, the speed-up efficiency; a MAC ratio is never called a speed-up."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.errors import CarveError
from pipeline.graph.cost import model_cost
from pipeline.graph.io import load
from pipeline.measure.ab import measure_pair
from pipeline.measure.agreement import agreement
from pipeline.measure.config import MeasureConfig
from pipeline.measure.environment import environment
from pipeline.measure.memory import measure_in_fresh_process

SCHEMA_VERSION = 1


def model_info(path: Path) -> dict:
    m = load(path)
    c = model_cost(m)
    data = path.read_bytes()
    meta = m.metadata()
    return {
        "path": str(path),
        "name": path.stem,
        "sha256": hashlib.sha256(data).hexdigest()[:16],
        "onnx_bytes": len(data),
        "weight_bytes": m.weight_bytes(),
        "params": c.params,
        "macs": c.macs,
        "carved": "carve.history" in meta,
    }


def compare(
    a: str | Path,
    b: str | Path,
    cfg: MeasureConfig | None = None,
    *,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure ``b`` against ``a`` (speed-up > 1 means b is faster). Returns the report (schema in docs/)."""
    cfg = cfg or MeasureConfig()
    a, b = Path(a), Path(b)
    for p in (a, b):
        if not p.is_file():
            raise CarveError(f"{p}: no such model file")
    info = {"a": model_info(a), "b": model_info(b)}
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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
    if cfg.agreement:
        if progress:
            progress("agreement")
        report["agreement"] = agreement(a, b, cfg, cfg.batch[0])
    return report
