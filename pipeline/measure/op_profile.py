"""Where the time goes: one model's kernel time broken down by op type with ONNX Runtime's profiler (``carve bench
--by-op``).

The session is built as the ORT engine builds its own (:mod:`carve.pipeline.measure.backends.ort`: the same threads,
one inter-op thread, sequential execution, full graph optimisation, no spinning, the same providers) with profiling on;
after a warm-up it runs ``runs`` times and the profiler's trace is read back: every ``Node`` event whose name ends in
``_kernel_time`` is one kernel of one run, with its op type (``args.op_name``) and duration. The op types are those of
the graph ORT ran, after its own fusions (``FusedConv`` is a Conv with its activation, ``QLinearConv`` an INT8 conv),
and an ``If``'s time includes its subgraph's kernels. The shares are of the summed kernel time, which leaves out
what the session does between kernels; ``run_ms`` is the wall time of a profiled run, for scale (profiling adds
overhead: compare shares, not these times, with ``carve bench``'s latencies).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from carve.pipeline.errors import CarveError, first_line
from carve.pipeline.measure.backends import EngineConfig
from carve.pipeline.measure.backends.ort import LEVELS, provider_options
from carve.pipeline.runtime.ort import input_specs

WARMUP = 3


def kernel_times(trace: list[dict], skip_runs: int = 0) -> dict[str, dict]:
    """Per op type: summed kernel time (µs) and the node names seen, from an ORT profiler trace, leaving out the
    kernels of the first ``skip_runs`` runs (the session's ``model_run`` events mark where runs start)."""
    starts = sorted(float(ev["ts"]) for ev in trace if ev.get("cat") == "Session" and ev.get("name") == "model_run")
    since = starts[skip_runs] if skip_runs and len(starts) > skip_runs else float("-inf")
    out: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "nodes": set()})
    for ev in trace:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        if float(ev.get("ts", 0)) < since:
            continue
        op = (ev.get("args") or {}).get("op_name") or "?"
        out[op]["us"] += float(ev.get("dur", 0))
        out[op]["nodes"].add(ev["name"][: -len("_kernel_time")])
    return out


def op_profile(model: str | Path, config: EngineConfig | None = None, *, runs: int = 20) -> dict:
    """Kernel time of ``model`` by op type on ONNX Runtime (``config``: threads, batch, device, seed), averaged over
    ``runs`` profiled runs after a warm-up. Returns ``{"runs", "run_ms", "kernel_ms", "provider", "ops": [{"op",
    "ms", "share", "nodes"}, ...]}``, ops sorted by time, ``ms`` per run."""
    import onnx
    import onnxruntime as ort

    config = config or EngineConfig()
    if runs < 1:
        raise CarveError(f"an op profile needs at least one run, got {runs}")
    proto = onnx.load(str(model), load_external_data=False)
    specs = input_specs(proto, config.batch, strict=True)
    requested = provider_options(config, {n: s for n, (s, _) in specs.items()})
    rng = np.random.default_rng(config.seed)
    feeds = {
        n: rng.standard_normal(s).astype(d) if np.issubdtype(d, np.floating) else np.zeros(s, d)
        for n, (s, d) in specs.items()
    }
    with tempfile.TemporaryDirectory(prefix="carve-opprof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = config.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[config.optimization])
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        try:
            sess = ort.InferenceSession(
                str(model), so, providers=[p for p, _ in requested], provider_options=[o for _, o in requested]
            )
        except Exception as exc:
            raise CarveError(f"{model}: ONNX Runtime could not build a profiling session: {first_line(exc)}") from None
        for _ in range(WARMUP):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        run_ms = (time.perf_counter() - t0) * 1e3 / runs
        trace = json.loads(Path(sess.end_profiling()).read_text())
        provider = sess.get_providers()[0]
    times = kernel_times(trace, skip_runs=WARMUP)
    total = sum(v["us"] for v in times.values())
    ops = [
        {
            "op": op,
            "ms": round(v["us"] / runs / 1e3, 5),
            "share": round(v["us"] / total, 5) if total else 0.0,
            "nodes": len(v["nodes"]),
        }
        for op, v in sorted(times.items(), key=lambda kv: -kv[1]["us"])
    ]
    return {
        "runs": runs,
        "run_ms": round(run_ms, 4),
        "kernel_ms": round(total / runs / 1e3, 4),
        "provider": provider,
        "batch": config.batch,
        "threads": config.threads,
        "ops": ops,
    }


def by_op_table(doc: dict, top: int = 12) -> list[str]:
    """Markdown: each op type's share of kernel time in A and B (the report's ``by_op`` section), the ops with the
    most time in A or B first, the rest summed in one row."""
    a = {r["op"]: r for r in doc["by_op"]["a"]["ops"]}
    b = {r["op"]: r for r in doc["by_op"]["b"]["ops"]}
    order = sorted(set(a) | set(b), key=lambda op: -max(a.get(op, {}).get("ms", 0), b.get(op, {}).get("ms", 0)))
    lines = [
        "| op type | A ms/run | A share | B ms/run | B share | B/A time |",
        "|---|---|---|---|---|---|",
    ]

    def row(name: str, ra: dict, rb: dict) -> str:
        ma, mb = ra.get("ms", 0.0), rb.get("ms", 0.0)
        ratio = f"{mb / ma:.2f}" if ma > 0 else "-"
        return f"| {name} | {ma:.3f} | {ra.get('share', 0.0):.1%} | {mb:.3f} | {rb.get('share', 0.0):.1%} | {ratio} |"

    for op in order[:top]:
        lines.append(row(f"`{op}`", a.get(op, {}), b.get(op, {})))
    rest = order[top:]
    if rest:
        sa = {k: sum(a.get(op, {}).get(k, 0.0) for op in rest) for k in ("ms", "share")}
        sb = {k: sum(b.get(op, {}).get(k, 0.0) for op in rest) for k in ("ms", "share")}
        lines.append(row(f"{len(rest)} other op types", sa, sb))
    pa, pb = doc["by_op"]["a"], doc["by_op"]["b"]
    lines.append("")
    lines.append(
        f"ONNX Runtime's profiler on {pa['provider']}, batch {pa['batch']}, {pa['threads']} thread(s), "
        f"{pa['runs']} runs each: kernel time {pa['kernel_ms']:.3f} ms (A) and {pb['kernel_ms']:.3f} ms (B) per run. "
        "Op types are those ORT ran after its fusions; shares are of the summed kernel time."
    )
    return lines
