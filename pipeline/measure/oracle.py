"""What ``carve prune`` asks of measurement (the ``LatencyOracle`` of :mod:`carve.pipeline.pruning.closed_loop`): the
latency table of a model on one engine (a given file, checked against the model and settings; or the cache; or profiled
now), and a quick interleaved A/B of a pruned model against the original on the same engine.

The quick A/B is :func:`carve.pipeline.measure.ab.measure_pair` with few, short rounds (``rounds``, ``min_round_ms``):
it decides whether a plan met its target and says whether the written model is faster, in about a second for the
models of the zoo; ``carve bench`` is the thorough measurement. On the CPU with one thread both time with the
thread's CPU clock (``clock=auto``), which on a shared machine is far steadier than the wall clock.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from carve.pipeline.graph.model import Model
from carve.pipeline.measure.ab import measure_pair
from carve.pipeline.measure.backends import get
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.latency_table import LatencyTable
from carve.pipeline.measure.profile import ProfileSettings, profile
from carve.pipeline.progress import Progress


@dataclass
class MeasuredLatency:
    backend: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    precision: str = "fp32"
    lut: str | None = None  # a table file to use instead of the cache / profiling
    clock: str = "auto"
    rounds: int = 10
    min_round_ms: float = 20.0
    warmup_ms: float = 50.0
    profiling: ProfileSettings | None = None  # how to profile when no table is given or cached
    progress: Progress | None = None
    tables: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_options(cls, opts, progress: Progress | None = None, **kw) -> MeasuredLatency:
        """From :class:`carve.pipeline.pruning.prune.PruneOptions` (its backend, device, threads, batch, precision,
        lut)."""
        fields = {k: getattr(opts, k) for k in ("backend", "device", "threads", "batch", "precision", "lut")}
        return cls(**fields, progress=progress, **kw)

    def describe(self) -> str:
        where = self.backend if self.backend != "ort" else f"ort {self.device}"
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.device == "cpu" else ""
        return f"{where} {self.precision}{threads}, batch {self.batch}"

    def settings(self) -> ProfileSettings:
        return replace(
            self.profiling or ProfileSettings(),
            backend=self.backend,
            device=self.device,
            threads=self.threads,
            batch=self.batch,
            precision=self.precision,
        )

    def table(self, model: Model) -> LatencyTable:
        get(self.backend).require()
        settings = self.settings()
        key = settings.key(model)
        if self.lut:
            table = LatencyTable.load(self.lut)
            table.check(key, where=self.lut)
            return table
        digest = key["model"]
        if digest not in self.tables:
            self.tables[digest] = profile(model, settings, progress=self.progress)
        return self.tables[digest]

    def measure(self, original: Model, pruned: Model) -> dict:
        if self.progress:
            self.progress(f"measuring the pruned model against the original ({self.describe()})")
        batch = self.batch_for(original)
        cfg = MeasureConfig(
            backend=self.backend,
            device=self.device,
            precision=self.precision,
            batch=[batch],
            threads=[self.threads],
            rounds=self.rounds,
            min_round_ms=self.min_round_ms,
            warmup_ms=self.warmup_ms,
            clock=self.clock,
            memory=False,
            agreement=False,
        )
        with tempfile.TemporaryDirectory(prefix="carve-ab-") as tmp:
            a, b = Path(tmp) / "original.onnx", Path(tmp) / "pruned.onnx"
            onnx.save_model(original.proto, str(a))
            onnx.save_model(pruned.proto, str(b))
            res = measure_pair(a, b, cfg, batch, self.threads)
        s = res["speedup"]
        return {
            "ratio": round(1.0 / s["median"], 4),
            "speedup": round(s["median"], 4),
            "ci": [round(s["ci_low"], 4), round(s["ci_high"], 4)],
            "a_ms": round(res["a"]["median_ms"], 4),
            "b_ms": round(res["b"]["median_ms"], 4),
            "clock": res["a"]["engine"].get("clock"),
            "rounds": self.rounds,
            "batch": batch,
        }

    def batch_for(self, model: Model) -> int:
        """The batch to measure at: ours, unless the model's batch is static (it runs at nothing else)."""
        from carve.pipeline.runtime.ort import input_specs

        static = {shape[0] for shape, _ in input_specs(model.proto, self.batch).values() if shape}
        return static.pop() if len(static) == 1 else self.batch
