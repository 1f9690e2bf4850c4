"""A sweep file, validated with the dataclasses recipes use (:func:`carve.pipeline.config.from_mapping`: unknown keys
name the valid ones, values are coerced to their field's type or refused naming the file and the key), and its
expansion into points: every combination of the axes."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carve.pipeline.config import bounds, from_mapping
from carve.pipeline.errors import CarveError
from carve.pipeline.flows.recipe import BENCH_KEYS, DataSection, read_mapping
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.pruning.allocator import allocators
from carve.pipeline.pruning.criterion import criteria
from carve.pipeline.pruning.prune import LEGACY_REPAIR_KEYS, PruneOptions
from carve.pipeline.pruning.repair import RepairStep, parse_repairs
from carve.pipeline.pruning.targets import OPTION, Target
from carve.pipeline.training.finetune import FinetuneOptions

# prune options the axes own: a sweep's `prune:` section may not set them
AXIS_OWNED = {"criterion", "allocator", "repairs", *OPTION.values(), *LEGACY_REPAIR_KEYS}
GPU_BACKENDS = {"trt", "torch-cuda"}
MAX_POINTS = 10_000  # a sweep file expands to at most this many points (issue 21: a 6 KB file made 10 million)


@dataclass
class SweepFile:
    """The top-level keys of a sweep file."""

    model: str | None = None
    axes: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    quantize: dict[str, Any] | None = None  # options of the quantize pass of `axes.quantize: int8` points
    seed: int = 0
    name: str | None = None


@dataclass
class AxesSection:
    """``axes:``: every combination of their values is one point."""

    criterion: list[str] | None = None
    target: dict[str, Any] | None = None
    allocator: list[str] = field(default_factory=lambda: ["uniform"])
    repair: list[Any] = field(default_factory=lambda: ["none"])  # each value a repair list: none, lsq+bn, [lsq, bn]
    finetune_epochs: list[float] = field(default_factory=lambda: [0.0], metadata=bounds(ge=0))
    quantize: list[str] = field(default_factory=lambda: ["none"])  # none | int8 (the quantize pass last)


QUANTIZE_VALUES = ("none", "int8")


@dataclass
class TargetAxis:
    """``axes.target``: the kind of target and its values."""

    kind: str = field(default="macs", metadata=bounds(choices=("macs", "params", "ratio")))
    values: list[float] | None = None


@dataclass
class Sweep:
    path: Path
    model: str  # zoo:NAME or an absolute ONNX path
    axes: dict[
        str, list[Any]
    ]  # criterion, allocator, target (Target), repair (repair lists), finetune_epochs, quantize
    target_kind: str
    data: dict[str, Any] = field(default_factory=dict)  # paths made absolute; digits and shared: as written
    prune: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    name: str = ""
    quantize: dict[str, Any] = field(default_factory=dict)

    def axes_json(self) -> dict[str, Any]:
        """The axes as plain data (targets as their values, repair lists spelled), with the target kind."""
        a = self.axes
        out = {**a, "target": [t.value for t in a["target"]], "repair": [spell(r) for r in a["repair"]]}
        return {**out, "target_kind": self.target_kind}

    @property
    def gpu(self) -> bool:
        """Whether points are measured on a GPU (Ray then asks for one per point)."""
        return str(self.bench.get("backend", "ort")) in GPU_BACKENDS or str(self.bench.get("device", "cpu")) == "cuda"


def spell(repairs: tuple[RepairStep, ...] | list[RepairStep]) -> str:
    """A repair list as one axis value: ``none``, ``lsq``, ``lsq+bn``, ``lsq(ridge=0.01)+bn``."""
    return "+".join(s.spell() for s in repairs) or "none"


@dataclass(frozen=True)
class Point:
    criterion: str
    allocator: str
    target: Target
    repairs: tuple[RepairStep, ...]
    finetune_epochs: float
    quantize: str = "none"

    @property
    def repair(self) -> str:
        return spell(self.repairs)

    @property
    def id(self) -> str:
        ft = f"{self.finetune_epochs:g}"
        parts = [self.criterion, self.allocator, f"{self.target.kind}{self.target.value:g}", self.repair, f"ft{ft}"]
        if self.quantize != "none":  # FP32 points keep the ids they always had
            parts.append(self.quantize)
        return re.sub(r"[^A-Za-z0-9.+=-]+", "_", "-".join(parts))

    def axes(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "allocator": self.allocator,
            "target_kind": self.target.kind,
            "target": self.target.value,
            "repair": self.repair,
            "finetune_epochs": self.finetune_epochs,
            "quantize": self.quantize,
        }


def _unique(where: str, values: list[Any]) -> list[Any]:
    if not values:
        raise CarveError(f"{where}: an axis needs at least one value")
    if len(set(map(str, values))) != len(values):
        raise CarveError(f"{where}: repeated values in {values}")
    return values


def _registered(where: str, names: list[str], registry) -> None:
    for name in names:
        if name.split("[")[0] not in registry:
            raise CarveError(f"{where}: unknown {registry.kind} {name!r}; valid: {', '.join(registry.names())}")


def _axes(path: Path, doc: Any) -> tuple[dict[str, list[Any]], str]:
    a = from_mapping(AxesSection, doc, where=f"{path}: axes")
    for key in ("criterion", "target"):
        if getattr(a, key) is None:
            raise CarveError(f"{path}: missing `axes.{key}`")
    target = from_mapping(TargetAxis, a.target, where=f"{path}: axes.target")
    values = _unique(f"{path}: axes.target.values", target.values or [])
    try:
        targets = [Target(target.kind, v) for v in values]
    except CarveError as exc:
        raise CarveError(f"{path}: axes.target.values: {exc.message}") from None
    _registered(f"{path}: axes.criterion", _unique(f"{path}: axes.criterion", a.criterion), criteria)
    _registered(f"{path}: axes.allocator", _unique(f"{path}: axes.allocator", a.allocator), allocators)
    repairs = [tuple(parse_repairs(r, where=f"{path}: axes.repair")) for r in a.repair]
    _unique(f"{path}: axes.repair", [spell(r) for r in repairs])
    axes = {
        "criterion": a.criterion,
        "allocator": a.allocator,
        "target": targets,
        "repair": repairs,
        "finetune_epochs": _unique(f"{path}: axes.finetune_epochs", a.finetune_epochs),
        "quantize": _unique(f"{path}: axes.quantize", [str(q) for q in a.quantize]),
    }
    for q in axes["quantize"]:
        if q not in QUANTIZE_VALUES:
            raise CarveError(f"{path}: axes.quantize: {q!r} is not one of {', '.join(QUANTIZE_VALUES)}")
    n = count_points(axes)
    if n > MAX_POINTS:
        raise CarveError(
            f"{path}: axes expand to {n:,} points; a sweep may have at most {MAX_POINTS:,}",
            hint="split it into several sweeps, or fewer values per axis",
        )
    return axes, target.kind


def _data(path: Path, doc: dict[str, Any] | None) -> dict[str, Any]:
    data = dict(doc or {})
    from_mapping(DataSection, data, where=f"{path}: data")
    for key in ("calib", "eval", "train"):
        v = data.get(key)
        if v is not None and not isinstance(v, str):
            raise CarveError(f"{path}: data.{key} must name a data file, a folder, digits or shared:PATH; got {v!r}")
        if v is not None and not str(v).startswith(("digits", "shared:")):  # as written: load_data resolves them
            p = Path(v) if Path(v).is_absolute() else path.parent / v
            data[key] = str(p.resolve())
    return data


def _model(path: Path, model: str) -> str:
    if model.startswith("zoo:"):
        return model
    p = Path(model) if Path(model).is_absolute() else path.parent / model
    if not p.is_file():
        raise CarveError(f"{path}: model: no such file {p}")
    return str(p.resolve())


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every error names the file and the key."""
    path = Path(path)
    doc = read_mapping(path, "sweep", "`model`, `axes` and `bench`")
    top = from_mapping(SweepFile, doc, where=str(path))
    for key in ("model", "axes", "bench"):
        if not getattr(top, key):
            raise CarveError(f"{path}: missing `{key}`" + (" (each point is measured)" if key == "bench" else ""))
    axes, kind = _axes(path, top.axes)
    data = _data(path, top.data)
    if "eval" not in data:
        raise CarveError(f"{path}: missing `data.eval` (each point's accuracy is measured on it)")
    if any(e > 0 for e in axes["finetune_epochs"]) and "train" not in data:
        raise CarveError(f"{path}: axes.finetune_epochs > 0 needs `data.train`")
    needs_calib = [s.name for r in axes["repair"] for s in r if "calib" in s.build().needs]
    if needs_calib and "calib" not in data:
        raise CarveError(f"{path}: axes.repair ({needs_calib[0]}) needs `data.calib` (it reads calibration data)")
    if "int8" in axes["quantize"] and "calib" not in data:
        raise CarveError(f"{path}: axes.quantize int8 needs `data.calib` (INT8 calibration data)")
    quantize = dict(top.quantize or {})
    if quantize:
        from carve.pipeline.passes import build

        try:
            build("quantize", **quantize)
        except CarveError as exc:
            raise CarveError(f"{path}: quantize: {exc.message}") from None
    prune = dict(top.prune or {})
    owned = sorted(set(prune) & AXIS_OWNED)
    if owned:
        raise CarveError(f"{path}: prune.{owned[0]} is set by the axes; remove it from `prune:`")
    PruneOptions.from_mapping(prune, where=f"{path}: prune")
    finetune = dict(top.finetune or {})
    if "epochs" in finetune or "steps" in finetune:
        raise CarveError(f"{path}: finetune.epochs/steps: the fine-tuning budget is the axis `finetune_epochs`")
    from_mapping(FinetuneOptions, finetune, where=f"{path}: finetune")
    bench = dict(top.bench)
    bench.setdefault("memory", False)  # memory needs fresh processes per point; ask for it explicitly
    from_mapping(MeasureConfig, bench, where=f"{path}: bench", only=BENCH_KEYS)
    sweep = Sweep(
        path=path.resolve(),
        model=_model(path, str(top.model)),
        axes=axes,
        target_kind=kind,
        data=data,
        prune=prune,
        finetune=finetune,
        bench=bench,
        seed=top.seed,
        name=str(top.name or path.stem),
        quantize=quantize,
    )
    points = expand(sweep)
    _check_ids(path, points)
    from carve.pipeline.flows.sweep.points import check_points  # (points builds on this module)

    check_points(sweep, points)
    return sweep


def count_points(axes: dict[str, list[Any]]) -> int:
    n = 1
    for key in ("criterion", "allocator", "target", "repair", "finetune_epochs", "quantize"):
        n *= len(axes.get(key) or [None])
    return n


def _check_ids(path: Path, points: list[Point]) -> None:
    """Each point's id names its record and model file: two points with one id would overwrite each other."""
    seen: dict[str, Point] = {}
    for p in points:
        if p.id in seen:
            raise CarveError(
                f"{path}: two points get the id {p.id!r} ({seen[p.id].axes()} and {p.axes()}); their records and "
                "models would overwrite each other",
                hint="make axis values differ in their first 6 significant digits (ids print numbers with %g)",
            )
        seen[p.id] = p


def expand(sweep: Sweep) -> list[Point]:
    """Every combination of the axes, in the order the file lists them."""
    a = sweep.axes
    return [
        Point(c, al, t, r, e, q)
        for c, al, t, r, e, q in itertools.product(
            a["criterion"], a["allocator"], a["target"], a["repair"], a["finetune_epochs"], a.get("quantize", ["none"])
        )
    ]
