"""Interleaved A/B timing: the method behind ``carve bench``, recipes' measurements and per-layer decisions.

Both engines are built with the same configuration and warmed up; then they run in alternating rounds (A then B, then
B then A, ...), each round long enough (``min_round_s``) for the timer to be negligible. Drift of the machine
(thermals, a background process) hits both alike, and the order alternates so neither always runs second. The
speed-up is the median over rounds of mean-time(A) / mean-time(B), with a bootstrap confidence interval of that median:
ratios measured in one run are what reports and the gate trust, not absolute times. :func:`interleave_many` is the
same method over any number of engines (latency tables time a layer at many widths in one round-robin).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.measure.backends import EngineConfig, settings_differ
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.runners import LocalRunner, RemoteRunner
from carve.pipeline.measure.stats import bootstrap_median_ci, latency_stats
from carve.pipeline.progress import Progress


@dataclass
class Interleaved:
    """Per-run latencies of each round (seconds) and the per-round ratios mean(A) / mean(B)."""

    a: list[np.ndarray]
    b: list[np.ndarray]
    ratios: np.ndarray
    iterations_per_round: int


def interleave(
    ra,
    rb,
    *,
    rounds: int,
    min_round_s: float,
    warmup_s: float,
    progress: Progress | None = None,
    stage: str = "round",
) -> Interleaved:
    """Warm both runners up, size a round to ``min_round_s``, then run ``rounds`` alternating rounds (``progress``
    hears ``stage`` with the rounds done)."""
    run = interleave_many(
        [ra, rb], rounds=rounds, min_round_s=min_round_s, warmup_s=warmup_s, progress=progress, stage=stage
    )
    means = run.means()
    return Interleaved(run.times[0], run.times[1], means[:, 0] / means[:, 1], run.iterations_per_round)


@dataclass
class RoundRobin:
    """Per-run latencies (seconds) of each runner in each round: ``times[k][r]`` is runner k's round r, of
    ``iterations[k]`` runs."""

    times: list[list[np.ndarray]]
    iterations: list[int]

    @property
    def iterations_per_round(self) -> int:
        return self.iterations[0]

    def means(self) -> np.ndarray:
        """Mean latency per (round, runner)."""
        return np.array([[float(t.mean()) for t in per_runner] for per_runner in zip(*self.times)])

    def ratios(self, reference: int = 0) -> np.ndarray:
        """Per (round, runner): mean time / the reference runner's mean time in the same round."""
        m = self.means()
        return m / m[:, [reference]]


def interleave_many(
    runners: list,
    *,
    rounds: int,
    min_round_s: float,
    warmup_s: float,
    size_each: bool = False,
    progress: Progress | None = None,
    stage: str = "round",
) -> RoundRobin:
    """Interleaved rounds over any number of runners (latency tables time a layer at many widths at once): every
    round runs each runner in turn, in forward order on even rounds and reversed on odd ones, so drift hits all alike
    and none always runs first. Each runner's share of a round lasts at least ``min_round_s``: one run count for all,
    sized on the slowest, or (``size_each``) a count per runner, so a tiny layer is not timed by single runs."""
    singles = [max(r.warmup(warmup_s), 1e-7) for r in runners]
    counts = [int(min(10000, max(1, math.ceil(min_round_s / t)))) for t in singles]
    if not size_each:
        counts = [min(counts)] * len(runners)
    times: list[list[np.ndarray]] = [[] for _ in runners]
    for r in range(rounds):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for k in order:
            times[k].append(np.asarray(runners[k].round(counts[k])))
        if progress:
            progress(stage, r + 1, rounds)
    return RoundRobin(times, counts)


def measure_pair(
    a: Path, b: Path, cfg: MeasureConfig, batch: int, threads: int, progress: Progress | None = None
) -> dict:
    """One configuration: interleaved rounds, stats, speed-up with its confidence interval."""
    runner = RemoteRunner if cfg.isolate else LocalRunner
    ec = cfg.engine_config(batch, threads)
    ra = runner(cfg.backend, a, ec)
    try:
        rb = runner(cfg.backend, b, ec)
    except BaseException:
        ra.close()
        raise
    try:
        differ = settings_differ(ra.info(), rb.info())
        if differ:
            raise CarveError(
                f"{a.name} and {b.name} did not run with the same engine settings ({'; '.join(differ)}): a speed-up "
                "between them would not compare the models",
                hint="set the differing option explicitly for both (e.g. `cuda_graphs=false`)",
            )
        run = interleave(
            ra,
            rb,
            rounds=cfg.rounds,
            min_round_s=cfg.min_round_ms / 1000,
            warmup_s=cfg.warmup_ms / 1000,
            progress=progress,
            stage=f"batch {batch}, {threads} thread(s): round",
        )
        med, lo, hi = bootstrap_median_ci(run.ratios, confidence=cfg.confidence, resamples=cfg.bootstrap, seed=cfg.seed)
        out: dict[str, Any] = {
            "backend": cfg.backend,
            "device": cfg.device,
            "precision": cfg.precision,
            "batch": batch,
            "threads": threads,
            "iterations_per_round": run.iterations_per_round,
            "rounds": cfg.rounds,
            "isolated": cfg.isolate,
        }
        rng = np.random.default_rng(cfg.seed)
        for key, runner_, lat in (("a", ra, run.a), ("b", rb, run.b)):
            times = np.concatenate(lat)
            stats = latency_stats(times, batch)
            kept = times if len(times) <= cfg.max_samples_kept else rng.choice(times, cfg.max_samples_kept, False)
            stats["samples_ms"] = [round(float(x) * 1e3, 6) for x in kept]
            stats["round_means_ms"] = [round(float(x.mean()) * 1e3, 6) for x in lat]
            stats["engine"] = runner_.info()
            stats["engine_memory"] = runner_.memory()
            out[key] = stats
        out["speedup"] = {
            "median": med,
            "ci_low": lo,
            "ci_high": hi,
            "confidence": cfg.confidence,
            "round_ratios": [round(float(x), 6) for x in run.ratios],
        }
        return out
    finally:
        ra.close()
        rb.close()


def time_ratio(
    a: onnx.ModelProto | str | Path,
    b: onnx.ModelProto | str | Path,
    *,
    backend: str = "ort",
    threads: int = 1,
    batch: int = 1,
    rounds: int = 15,
    min_round_s: float = 0.01,
    warmup_s: float = 0.05,
) -> float:
    """Median over interleaved rounds of time(a) / time(b) on ``backend`` (above 1: b is faster). For small models
    such as one layer and its replacement (``merge --when slower``); protos are written to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="carve-ab-") as tmp:
        paths = []
        for name, m in (("a", a), ("b", b)):
            if isinstance(m, onnx.ModelProto):
                p = Path(tmp) / f"{name}.onnx"
                onnx.save_model(m, str(p))
                m = p
            paths.append(m)
        config = EngineConfig(batch=batch, threads=threads)
        ra, rb = LocalRunner(backend, paths[0], config), LocalRunner(backend, paths[1], config)
        try:
            run = interleave(ra, rb, rounds=rounds, min_round_s=min_round_s, warmup_s=warmup_s)
        finally:
            ra.close()
            rb.close()
    return float(np.median(run.ratios))
