"""Runners: an engine with the few operations the A/B loop needs (warm up, time a round, outputs, memory, info),
either in this process (:class:`LocalRunner`) or in a worker process of its own (:class:`RemoteRunner`, a
``multiprocessing`` manager proxy of a LocalRunner: every call runs in the worker, exceptions come back as they
were raised)."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.managers import BaseManager
from pathlib import Path

import numpy as np

from carve.pipeline.errors import CarveError
from carve.pipeline.measure.backends import Engine, EngineConfig, build


class LocalRunner:
    def __init__(self, backend: str, model: str | Path, config: EngineConfig) -> None:
        self.engine: Engine = build(backend, model, config)

    @classmethod
    def of(cls, engine: Engine) -> LocalRunner:
        """A runner around an engine built elsewhere (e.g. a native torch module, for tools/bench_native.py)."""
        runner = cls.__new__(cls)
        runner.engine = engine
        return runner

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
        cfg = getattr(self.engine, "config", None)
        clock = "thread-cpu" if cfg is not None and cfg.cpu_clock() else self.engine.clock
        return {**self.engine.info(), "clock": clock}

    def close(self) -> None:
        self.engine.close()


class _Workers(BaseManager):
    pass


_Workers.register("LocalRunner", LocalRunner)


class RemoteRunner:
    """A LocalRunner in its own process (``carve bench --isolate``)."""

    def __init__(self, backend: str, model: str | Path, config: EngineConfig) -> None:
        self._workers = _Workers(ctx=mp.get_context("spawn"))
        self._workers.start()
        try:
            self._runner = self._workers.LocalRunner(backend, str(model), config)  # type: ignore[attr-defined]
        except Exception as exc:
            self._workers.shutdown()
            if isinstance(exc, CarveError):
                raise
            raise CarveError(f"{model}: the engine failed to build in its worker process: {exc}") from None

    def __getattr__(self, name: str):
        # warmup, round, outputs, memory, info: forwarded to the worker's LocalRunner
        runner = self.__dict__.get("_runner")
        if runner is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(runner, name)

    def close(self) -> None:
        try:
            self._runner.close()
        finally:
            self._workers.shutdown()
