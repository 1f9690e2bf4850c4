"""Configuration of a side-by-side measurement (``carve bench``, recipes' ``bench`` section). Field names are the
command line's option names and the recipe keys (:mod:`carve.pipeline.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from carve.pipeline.config import bounds
from carve.pipeline.measure.backends import EngineConfig


@dataclass
class MeasureConfig:
    backend: str = "ort"
    batch: list[int] = field(default_factory=lambda: [1], metadata=bounds(ge=1))  # batch sizes
    threads: list[int] = field(default_factory=lambda: [1], metadata=bounds(ge=1))
    precision: str = field(default="fp32", metadata=bounds(choices=("fp32", "fp16")))
    device: str = "cpu"
    cuda_graphs: bool | None = None  # None: the backend's default (torch-cuda and trt: on; ort: off)
    channels_last: bool | None = None  # torch backends: None = on for CUDA
    compile: bool = False  # torch backends: torch.compile (inductor) the runner's static program
    provider_options: dict[str, str] = field(default_factory=dict)  # ort GPU providers: extra options
    spinning: bool = False  # ort: idle pool threads spin (see EngineConfig); off for fair A/B on shared cores
    rounds: int = field(default=20, metadata=bounds(ge=1))
    min_round_ms: float = field(default=50.0, metadata=bounds(ge=0))  # each model's round lasts at least this long
    warmup_ms: float = field(default=300.0, metadata=bounds(ge=0))
    isolate: bool = False
    # CPU timing: wall | cpu (thread CPU time, one thread) | auto (cpu when one thread)
    clock: str = field(default="wall", metadata=bounds(choices=("wall", "cpu", "auto")))
    confidence: float = field(default=0.95, metadata=bounds(gt=0, lt=1))
    bootstrap: int = field(default=2000, metadata=bounds(ge=1))
    seed: int = 0
    memory: bool = True
    agreement: bool = True
    by_op: bool = False  # ort: each model's kernel time by op type (ONNX Runtime's profiler), first batch/threads
    data: str | None = None  # agreement inputs from a data file instead of random
    agreement_samples: int = field(default=256, metadata=bounds(ge=1))
    max_samples_kept: int = field(default=400, metadata=bounds(ge=1))  # latencies kept per model (for plots)

    def engine_config(self, batch: int, threads: int) -> EngineConfig:
        return EngineConfig(
            batch=batch,
            threads=threads,
            precision=self.precision,
            device=self.device,
            cuda_graphs=self.cuda_graphs,
            channels_last=self.channels_last,
            compile=self.compile,
            provider_options=dict(self.provider_options),
            seed=self.seed,
            spinning=self.spinning,
            clock=self.clock,
        )
