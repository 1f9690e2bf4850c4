"""Configuration of a side-by-side measurement (``carve bench``, recipes' ``bench`` section). Field names are the
command line's option names and the recipe keys (:mod:`pipeline.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.measure.backends import EngineConfig


@dataclass
class MeasureConfig:
    backend: str = "ort"
    batch: list[int] = field(default_factory=lambda: [1])  # batch sizes
    threads: list[int] = field(default_factory=lambda: [1])
    precision: str = "fp32"
    device: str = "cpu"
    cuda_graphs: bool | None = None  # None: the backend's default (torch-cuda and trt: on; ort: off)
    channels_last: bool | None = None  # torch backends: None = on for CUDA
    compile: bool = False  # torch backends: torch.compile (inductor) the runner's static program
    provider_options: dict[str, str] = field(default_factory=dict)  # ort GPU providers: extra options
    spinning: bool = False  # ort: idle pool threads spin (see EngineConfig); off for fair A/B on shared cores
    rounds: int = 20
    min_round_ms: float = 50.0  # each model's round lasts at least this long
    warmup_ms: float = 300.0
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
            channels_last=self.channels_last,
            compile=self.compile,
            provider_options=dict(self.provider_options),
            seed=self.seed,
            spinning=self.spinning,
        )
