"""The pass contract: requires -> run -> ensures, with instruments around every pass.

A :class:`Pass` transforms a :class:`~carve.pipeline.graph.Model` into a new one (never in place) and says what it did
in a :class:`PassResult`: one line per decision ("conv3: rank 12 of 64 (energy 0.95)", "conv7: skipped, rank 60 is above
the break-even 48"). It declares

* ``exact``: whether it must preserve the model's function (BN folding, merging a pair back, fusing an exact multiple);
  the :class:`NumericCheck` instrument then proves it on random inputs in ONNX Runtime and fails the run otherwise;
  for lossy passes it measures and reports the error instead;
* ``needs``: ``{"calib"}`` when it reads calibration data.

``ensures`` checks what every pass must keep: graph output shapes and a model that passes the full ONNX checker.
:class:`PassManager` runs a list of passes with instruments (timing, numeric check, dumping intermediates). Passes are
registered by name (``plugins/passes/``) so recipes and the CLI can find them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from carve.pipeline.data.batching import first_batch
from carve.pipeline.errors import CarveError, warn
from carve.pipeline.graph.history import record
from carve.pipeline.graph.io import save
from carve.pipeline.graph.model import Model, check_finite, nonfinite_initializers
from carve.pipeline.graph.shapes import verify_structure
from carve.pipeline.progress import Progress
from carve.pipeline.registry import Registry
from carve.pipeline.runtime.ort import random_feeds, run, run_checked
from carve.pipeline.runtime.verify import nonfinite_outputs, output_metrics

passes: Registry[type[Pass]] = Registry(
    "pass", entry_point_group="carve.passes", builtin_modules=["carve.plugins.passes"]
)


@dataclass
class PassContext:
    calib: Any = None  # calibration data, a carve.pipeline.data.datasets.Dataset
    train: Any = None  # training data (fine-tuning)
    eval: Any = None  # evaluation data (passes that report accuracy along the way)
    original: Model | None = None  # the model the run started from (the teacher of distillation)
    workdir: Path | None = None  # where a pass may write its side outputs (e.g. each step's model)
    seed: int = 0
    command: str | None = None
    progress: Progress | None = None  # carve.pipeline.progress: "pass <name>" k of n, and the pass's own stages
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    model: Model
    changed: bool
    details: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: dict[str, float] | None = None  # numeric comparison with the pass's input


class Pass:
    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    needs: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""
    records_history: ClassVar[bool] = False  # the pass writes its own carve.history entry (record_pass skips it)
    # a lossy post-training pass warns when its output's cosine with its input falls below this (None: never; passes
    # whose loss a later repair or fine-tuning is expected to recover, such as pruning, leave it None)
    warn_below_cosine: ClassVar[float | None] = None
    low_cosine_hint: ClassVar[str] = "keep more of the model, or repair / fine-tune it"

    def requires(self, model: Model, ctx: PassContext) -> None:
        if "calib" in self.needs and ctx.calib is None:
            raise CarveError(
                f"pass {self.name!r} needs calibration data", hint="give `calib` FILE.npz | FOLDER | digits"
            )
        if "train" in self.needs and ctx.train is None:
            raise CarveError(
                f"pass {self.name!r} needs training data", hint="give the recipe `data: {train: FILE.npz | FOLDER}`"
            )

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensures(self, before: Model, result: PassResult) -> None:
        verify_structure({n: before.shape(n) for n in before.output_names}, result.model, what=f"pass {self.name!r}")

    def __call__(self, model: Model, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.requires(model, ctx)
        t0 = time.perf_counter()
        result = self.run(model, ctx)
        result.seconds = time.perf_counter() - t0
        if result.changed:
            self.ensures(model, result)
        return result


# ---------------------------------------------------------------------------------------------------------------------
# instruments


class Instrument:
    def before(self, p: Pass, model: Model, ctx: PassContext) -> None:
        pass

    def after(self, p: Pass, model: Model, result: PassResult, ctx: PassContext) -> None:
        pass


class NumericCheck(Instrument):
    """Exact passes must keep outputs (relative error <= ``rtol``); lossy passes get their error measured. NaN or
    Inf a pass brings into the weights or the outputs is an error either way."""

    def __init__(self, rtol: float = 1e-4, batch: int = 2) -> None:
        self.rtol, self.batch = rtol, batch

    def after(self, p: Pass, model: Model, result: PassResult, ctx: PassContext) -> None:
        if not result.changed:
            return
        check_finite(result.model, had=nonfinite_initializers(model), what=f"pass {p.name!r}'s result")
        feeds = random_feeds(model, batch=self.batch, seed=ctx.seed)
        if ctx.calib is not None and not p.exact:
            feeds = {model.input_names[0]: first_batch(model, ctx.calib, 16)}
        before = run_checked(model, feeds, what=f"the model before pass {p.name!r}")
        after = run(result.model, feeds)
        if nonfinite_outputs(before):
            inputs = "calibration" if ctx.calib is not None and not p.exact else "random"
            raise CarveError(
                f"the model's outputs hold NaN or Inf on {inputs} inputs before pass {p.name!r}: nothing can be "
                "checked against them",
                hint="check the model's weights and the calibration data for NaN/Inf",
            )
        if nonfinite_outputs(after):
            raise CarveError(
                f"pass {p.name!r} made the model's outputs NaN or Inf; nothing was written",
                hint="check the pass's options and the calibration data",
            )
        result.error = output_metrics(before[0], after[0])
        low = p.warn_below_cosine
        if not p.exact and low is not None and result.error["cosine"] < low:
            inputs = "calibration" if ctx.calib is not None else "random"
            warn(
                f"pass {p.name!r} changed the model's outputs noticeably: cosine {result.error['cosine']:.3f} with "
                f"its input on {inputs} inputs (below {low}); {p.low_cosine_hint}"
            )
        if p.exact and not result.error["max_rel"] <= self.rtol:
            raise AssertionError(
                f"exact pass {p.name!r} changed the model's outputs (relative error {result.error['max_rel']:.3g})"
            )


class Timing(Instrument):
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def after(self, p: Pass, model: Model, result: PassResult, ctx: PassContext) -> None:
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + result.seconds


class Dump(Instrument):
    """Write every intermediate model: ``<dir>/<index>_<pass>.onnx``."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.index = 0

    def after(self, p: Pass, model: Model, result: PassResult, ctx: PassContext) -> None:
        self.index += 1
        self.dir.mkdir(parents=True, exist_ok=True)
        save(result.model, self.dir / f"{self.index:02d}_{p.name}.onnx")


class PassManager:
    def __init__(self, pass_list: list[Pass], instruments: list[Instrument] | None = None) -> None:
        self.passes = pass_list
        self.instruments = instruments if instruments is not None else [NumericCheck(), Timing()]

    def run(self, model: Model, ctx: PassContext | None = None) -> tuple[Model, list[PassResult]]:
        ctx = ctx or PassContext()
        results = []
        for k, p in enumerate(self.passes):
            for ins in self.instruments:
                ins.before(p, model, ctx)
            if ctx.progress:
                ctx.progress(f"pass {p.name}", k, len(self.passes))
            result = p(model, ctx)
            for ins in self.instruments:
                ins.after(p, model, result, ctx)
            results.append(result)
            model = result.model
            if ctx.progress:  # said as it finishes too: a display never stays at 0/1 after the pass
                ctx.progress(f"pass {p.name}", k + 1, len(self.passes))
        return model, results


def build(name: str, **options: Any) -> Pass:
    cls = passes.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise CarveError(f"pass {name!r}: {exc}") from None


def record_pass(model: Model, p: Pass, result: PassResult, command: str | None) -> None:
    """Record the pass in the model's ``carve.history`` (unless the pass records itself)."""
    if not p.records_history:
        record(model, p.name, {**result.summary, "details": result.details[:200]}, command=command)
