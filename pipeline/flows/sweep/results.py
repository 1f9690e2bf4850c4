"""``results.json``: every point's record, latency on a common footing, the Pareto front marked."""

from __future__ import annotations

import time

from carve.pipeline.config import from_mapping
from carve.pipeline.flows.pareto import mark_pareto
from carve.pipeline.flows.recipe import BENCH_KEYS
from carve.pipeline.flows.sweep.schema import Sweep


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
            "axes": sweep.axes_json(),
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
