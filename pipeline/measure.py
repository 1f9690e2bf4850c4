"""Measure two models side by side on the same engine: latency, throughput, speed-up with a confidence interval,
memory, agreement. What ``carve bench`` runs and what ``carve gate`` judges.

Method (docs/measure.md):

* Both engines are built with the same configuration, warmed up, and run in **interleaved rounds** (A then B, then B
  then A, ...), each round long enough (``min_round_s``) for the timer to be negligible. Drift of the machine
  (thermals, a background process) hits both models alike; the order alternates so neither always runs second.
* Per model: median, p90, p99, mean, std and coefficient of variation of the per-run latencies, and throughput
  (samples per second at the median).
* The **speed-up** is the median over rounds of time(A) / time(B) (above 1: B is faster), with a seeded bootstrap
  confidence interval of that median. Ratios measured in one run are what the gate trusts, not absolute times.
* The **MAC ratio** MACs(B) / MACs(A) is reported beside it, and their product, the speed-up efficiency (1.0: the
  measured speed-up is exactly what the MAC reduction would promise). A MAC ratio is never called a speed-up.
* ``isolate=True`` runs each engine in its own worker process (still interleaved, driven over pipes).
* Memory: ONNX file size, weight bytes, and peak resident memory of a fresh process that loads and runs the model
  (:mod:`pipeline.memory`), plus engine size and device memory where the backend reports them.
* Agreement of the outputs on the same inputs (random by default, or the first samples of a data file).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing as mp
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Engine, EngineConfig, build
from .errors import CarveError

SCHEMA_VERSION = 1


@dataclass
class MeasureConfig:
    backend: str = "ort"
    batches: list[int] = field(default_factory=lambda: [1])
    threads: list[int] = field(default_factory=lambda: [1])
    precision: str = "fp32"
    device: str = "cpu"
    cuda_graphs: bool = False
    spinning: bool = False  # ort: idle pool threads spin (see EngineConfig); off for fair A/B on shared cores
    rounds: int = 20
    min_round_s: float = 0.05
    warmup_s: float = 0.3
    isolate: bool = False
    confidence: float = 0.95
    bootstrap: int = 2000
    seed: int = 0
    memory: bool = True
    agreement: bool = True
    data: str | None = None  # agreement inputs from a data file instead of random
    agreement_samples: int = 256
    max_samples_kept: int = 400  # latencies kept per model in the report (for plots)

    def engine_config(self, batch: int, threads: int) -> EngineConfig:
        return EngineConfig(
            batch=batch,
            threads=threads,
            precision=self.precision,
            device=self.device,
            cuda_graphs=self.cuda_graphs,
            seed=self.seed,
            spinning=self.spinning,
        )


# ---------------------------------------------------------------------------------------------------------------------
# statistics


def latency_stats(times: np.ndarray, batch: int) -> dict[str, float]:
    t = np.asarray(times, dtype=np.float64)
    med = float(np.median(t))
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if len(t) > 1 else 0.0
    return {
        "median_ms": med * 1e3,
        "p90_ms": float(np.percentile(t, 90)) * 1e3,
        "p99_ms": float(np.percentile(t, 99)) * 1e3,
        "mean_ms": mean * 1e3,
        "std_ms": std * 1e3,
        "cv": std / mean if mean > 0 else 0.0,
        "throughput": batch / med if med > 0 else 0.0,
        "runs": int(len(t)),
    }


def bootstrap_median_ci(
    values: np.ndarray, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(median, low, high): percentile bootstrap confidence interval of the median."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("no values")
    med = float(np.median(v))
    if len(v) == 1:
        return med, med, med
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    meds = np.median(v[idx], axis=1)
    alpha = (1 - confidence) / 2
    return med, float(np.quantile(meds, alpha)), float(np.quantile(meds, 1 - alpha))


# ---------------------------------------------------------------------------------------------------------------------
# runners: an engine in this process, or in a worker process


class _Local:
    def __init__(self, backend: str, model: Path, config: EngineConfig) -> None:
        self.engine: Engine = build(backend, model, config)

    def warmup(self, seconds: float) -> float:
        """Run for ``seconds`` (at least 3 runs); return the median single-run time."""
        times = []
        t_end = time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < t_end:
            times.append(float(self.engine.times(1)[0]))
        return float(np.median(times))

    def round(self, n: int) -> np.ndarray:
        return self.engine.times(n)

    def outputs(self, feeds):
        return self.engine.outputs(feeds)

    def memory(self) -> dict:
        return self.engine.memory()

    def info(self) -> dict:
        return {**self.engine.info(), "clock": self.engine.clock}

    def close(self) -> None:
        self.engine.close()


def _worker(conn, backend: str, model: str, config: dict) -> None:
    try:
        local = _Local(backend, Path(model), EngineConfig(**config))
        conn.send(("ok", None))
    except Exception as exc:  # report the failure to the parent instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            break
        try:
            conn.send(("ok", getattr(local, cmd)(*arg)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class _Remote:
    """The same interface as _Local, with the engine in its own process."""

    def __init__(self, backend: str, model: Path, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, backend, str(model), asdict(config)), daemon=True)
        self.proc.start()
        status, msg = self.conn.recv()
        if status != "ok":
            raise CarveError(f"{model}: the engine failed to build in its worker process: {msg}")

    def _call(self, cmd: str, *arg):
        self.conn.send((cmd, arg))
        status, value = self.conn.recv()
        if status != "ok":
            raise CarveError(f"worker failed on {cmd}: {value}")
        return value

    def warmup(self, seconds: float) -> float:
        return self._call("warmup", seconds)

    def round(self, n: int) -> np.ndarray:
        return self._call("round", n)

    def outputs(self, feeds):
        return self._call("outputs", feeds)

    def memory(self) -> dict:
        return self._call("memory")

    def info(self) -> dict:
        return self._call("info")

    def close(self) -> None:
        try:
            self.conn.send(("stop", ()))
        finally:
            self.proc.join(timeout=10)


# ---------------------------------------------------------------------------------------------------------------------
# measuring


def measure_pair(
    a: Path, b: Path, cfg: MeasureConfig, batch: int, threads: int, progress: Callable[[str], None] | None = None
) -> dict:
    """One configuration: interleaved rounds, stats, speed-up with its confidence interval."""
    runner = _Remote if cfg.isolate else _Local
    ec = cfg.engine_config(batch, threads)
    ra, rb = runner(cfg.backend, a, ec), runner(cfg.backend, b, ec)
    try:
        one = max(ra.warmup(cfg.warmup_s), rb.warmup(cfg.warmup_s), 1e-7)
        n = int(min(10000, max(1, math.ceil(cfg.min_round_s / one))))
        lat = {"a": [], "b": []}
        ratios = []
        for r in range(cfg.rounds):
            order = (("a", ra), ("b", rb)) if r % 2 == 0 else (("b", rb), ("a", ra))
            means = {}
            for key, runner_ in order:
                t = np.asarray(runner_.round(n))
                lat[key].append(t)
                means[key] = float(t.mean())
            ratios.append(means["a"] / means["b"])
            if progress:
                progress(f"batch {batch}, {threads} thread(s): round {r + 1}/{cfg.rounds}")
        ratios = np.array(ratios)
        med, lo, hi = bootstrap_median_ci(ratios, confidence=cfg.confidence, resamples=cfg.bootstrap, seed=cfg.seed)
        out: dict[str, Any] = {
            "backend": cfg.backend,
            "device": cfg.device,
            "precision": cfg.precision,
            "batch": batch,
            "threads": threads,
            "iterations_per_round": n,
            "rounds": cfg.rounds,
            "isolated": cfg.isolate,
        }
        rng = np.random.default_rng(cfg.seed)
        for key, runner_ in (("a", ra), ("b", rb)):
            times = np.concatenate(lat[key])
            stats = latency_stats(times, batch)
            kept = times if len(times) <= cfg.max_samples_kept else rng.choice(times, cfg.max_samples_kept, False)
            stats["samples_ms"] = [round(float(x) * 1e3, 6) for x in kept]
            stats["round_means_ms"] = [round(float(x.mean()) * 1e3, 6) for x in lat[key]]
            stats["engine"] = runner_.info()
            stats["engine_memory"] = runner_.memory()
            out[key] = stats
        out["speedup"] = {
            "median": med,
            "ci_low": lo,
            "ci_high": hi,
            "confidence": cfg.confidence,
            "round_ratios": [round(float(x), 6) for x in ratios],
        }
        return out
    finally:
        ra.close()
        rb.close()


def agreement(a: Path, b: Path, cfg: MeasureConfig, batch: int) -> dict:
    """How closely the two models' outputs agree on the same inputs (first output; top-1 for classifiers)."""
    from .graph import load
    from .ortutil import random_feeds

    ma = load(a)
    ec = cfg.engine_config(batch, cfg.threads[0])
    ea, eb = build(cfg.backend, a, ec), build(cfg.backend, b, ec)
    xs, source = [], "random"
    if cfg.data:
        from .calib import load_data

        ds = load_data(cfg.data, model=ma, samples=cfg.agreement_samples, seed=cfg.seed)
        xs = [{ma.input_names[0]: x} for x, _ in ds.batches(batch)]
        source = cfg.data
    else:
        for k in range(max(1, cfg.agreement_samples // (batch * 8))):
            xs.append(random_feeds(ma, batch=batch, seed=cfg.seed + k))
    ya, yb = [], []
    for feeds in xs:
        if len(next(iter(feeds.values()))) != batch:
            continue  # engines are built for one batch size
        ya.append(np.asarray(ea.outputs(feeds)[0], dtype=np.float64))
        yb.append(np.asarray(eb.outputs(feeds)[0], dtype=np.float64))
    ea.close()
    eb.close()
    if not ya:
        return {"inputs": source, "samples": 0}
    x, y = np.concatenate(ya), np.concatenate(yb)
    if x.shape != y.shape:
        return {"inputs": source, "samples": int(len(x)), "error": f"output shapes differ: {x.shape} vs {y.shape}"}
    diff = np.abs(x - y)
    cos = float((x * y).sum() / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30))
    out = {
        "inputs": source,
        "samples": int(len(x)),
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(np.abs(x).max(), 1e-12)),
        "cosine": cos,
    }
    if x.ndim == 2 and x.shape[1] > 1:
        out["top1_agreement"] = float((x.argmax(1) == y.argmax(1)).mean())
    return out


def model_info(path: Path) -> dict:
    from .cost import model_cost
    from .graph import load

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


def environment(cfg: MeasureConfig | None = None) -> dict:
    import numpy
    import onnx

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    except OSError:
        env["cpu"] = platform.processor()
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.exists():
        env["cpu_governor"] = gov.read_text().strip()
    from . import __version__

    env["carve"] = __version__
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception:
        pass
    try:
        q = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if q.returncode == 0 and q.stdout.strip():
            env["nvidia_smi"] = q.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def compare(
    a: str | Path,
    b: str | Path,
    cfg: MeasureConfig | None = None,
    *,
    command: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure ``b`` against ``a`` (speed-up > 1 means b is faster). Returns the report (schema in docs/)."""
    from .memory import measure_in_fresh_process

    cfg = cfg or MeasureConfig()
    a, b = Path(a), Path(b)
    for p in (a, b):
        if not p.is_file():
            raise CarveError(f"{p}: no such model file")
    info = {"a": model_info(a), "b": model_info(b)}
    results = []
    for batch in cfg.batches:
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
        report["memory"] = {
            key: {
                str(batch): measure_in_fresh_process(p, cfg.backend, batch, cfg.threads[0], cfg.precision, cfg.device)
                for batch in cfg.batches
            }
            for key, p in (("a", a), ("b", b))
        }
    if cfg.agreement:
        if progress:
            progress("agreement")
        report["agreement"] = agreement(a, b, cfg, cfg.batches[0])
    return report
