"""Latency tables: for each prunable channel group, the measured latency of the layers it touches at candidate widths,
and the prediction of a pruned model's latency from them (HALP, Shen et al., NeurIPS 2022: a per-layer latency
lookup table measured on the target engine; NetAdapt, Yang et al., ECCV 2018: measure candidate widths on the target).

A table is made by :func:`carve.pipeline.measure.profile.profile` and holds, per group g (relative to the whole original
model's latency L0, all measured as interleaved ratios, so a busy machine's drift cancels):

* ``share`` t_g: the latency of g's subgraph (its producers, per-channel ops and consumers) at full width / L0;
* ``candidates`` and ``ratio``: kept units per slice of the group at each candidate width, and F_g = subgraph latency
  there / at full width (the staircase of the hardware);
* ``interactions`` tau_gh: the share of the layers that read one group and write another (a conv's input and output
  widths multiply: cutting both halves of a 3x3 conv leaves a quarter, not nothing).

The prediction for kept widths w (a fraction of L0) is

    P(w) = 1 + s [ sum_g t_g (F_g(w_g) - 1) + sum_(g,h) tau_gh (F_g(w_g) - 1) (F_h(w_h) - 1) ]

what was measured for any single group, bilinear where two groups meet, and calibrated by one scale s fitted to
whole pruned models (a layer cut out of its model does not save exactly what it saves in place: its inputs and
outputs are reordered, its neighbours' layouts differ). Widths between candidates are interpolated on the group's
total kept units. ``error`` records how far predictions were from whole pruned models measured against the original
(the profile's validation, leave-one-out), which bounds what the closed loop of ``carve prune --target-latency``
allows before it refines.

Tables are cached on disk (``$CARVE_CACHE`` or ``~/.cache/carve``, folder ``latency``) under a key of the model's
structure (nodes, attributes, shapes; not weight values, which do not change latency), the backend, device, machine,
threads, batch, precision, candidate grid and library versions: any change is a different key, i.e. a new table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.cost import bilinear_ratio
from carve.pipeline.graph.model import Model
from carve.pipeline.version import __version__

SCHEMA = 1
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
LIBRARIES = ("onnx", "onnxruntime", "onnxruntime-gpu", "torch", "tensorrt", "numpy")


@dataclass
class GroupTable:
    """One group's staircase: kept units per slice at each candidate (widest, i.e. full, first) and the latency of
    the group's subgraph there relative to full width."""

    group: int
    slices: list[int]
    candidates: list[list[int]]
    ratio: list[float]
    share: float
    nodes: list[str] = field(default_factory=list)
    measured_as: int | None = None  # the group whose identical subgraph was timed for this one

    def totals(self) -> np.ndarray:
        return np.array([sum(c) for c in self.candidates], dtype=np.float64)

    def factor(self, kept: list[int]) -> float:
        """F_g for kept units per slice: the measured value for a candidate; otherwise interpolated on the total of
        kept units between candidates (averaged over candidates of equal total), clamped at the ends."""
        kept = [int(k) for k in kept]
        for c, r in zip(self.candidates, self.ratio):
            if c == kept:
                return float(r)
        tot = self.totals()
        xs = np.unique(tot)
        ys = np.array([np.mean(np.asarray(self.ratio)[tot == x]) for x in xs])
        return float(np.interp(sum(kept), xs, ys))

    def fast(self, tolerance: float = 0.01) -> list[int]:
        """Indices of the candidates on the fast steps of the staircase: each strictly faster than every wider
        candidate (by ``tolerance``, a fraction of full-width latency). A width on a step's flat part costs what the
        step's widest width costs and keeps fewer channels, so it is never worth choosing."""
        cands = np.asarray(self.candidates)
        ratio = np.asarray(self.ratio)
        keep = []
        for i in range(len(cands)):
            wider = np.all(cands >= cands[i], axis=1) & np.any(cands > cands[i], axis=1)
            if not (wider & (ratio <= ratio[i] + tolerance)).any():
                keep.append(i)
        return sorted(keep, key=lambda i: (-int(cands[i].sum()), i))


@dataclass
class LatencyTable:
    key: dict[str, Any]
    model_ms: float  # the whole original model's median latency while profiling
    groups: list[GroupTable]
    interactions: list[list[float]] = field(default_factory=list)  # [g, h, tau]
    error: dict[str, Any] = field(default_factory=dict)  # validation: predicted vs measured whole models
    profile: dict[str, Any] = field(default_factory=dict)  # how it was measured: seconds, rounds, machine load
    scale: float = 1.0  # calibration of the predicted change on whole pruned models (the validation)

    @property
    def stated_error(self) -> float:
        """The relative error of a whole-model prediction this table vouches for (the validation's worst case, at
        least 3%: the quick A/B that checks a pruned model is not more precise than that)."""
        return max(float(self.error.get("max_abs", 0.1)), 0.03)

    def group(self, gid: int) -> GroupTable | None:
        return next((g for g in self.groups if g.group == gid), None)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "kind": "carve.latency_table", **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict, *, where: str = "latency table") -> LatencyTable:
        if not isinstance(doc, dict) or doc.get("kind") != "carve.latency_table":
            raise CarveError(f"{where}: not a carve latency table", hint="make one with `carve profile MODEL -o F`")
        if doc.get("schema") != SCHEMA:
            raise CarveError(f"{where}: latency table schema {doc.get('schema')} (this carve reads {SCHEMA})")
        check_table(doc, where)
        groups = [GroupTable(**g) for g in doc["groups"]]
        fields = {k: doc[k] for k in ("key", "model_ms", "interactions", "error", "profile", "scale") if k in doc}
        return cls(groups=groups, **fields)

    def save(self, path: str | Path) -> Path:
        from carve.pipeline.graph.io import atomic_write

        path = Path(path)
        with atomic_write(path) as f:
            json.dump(self.to_json(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise CarveError(f"{path}: no such latency table", hint="make one with `carve profile MODEL -o FILE`")
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not text (an .onnx given)
            raise CarveError(
                f"{path}: not a readable latency table ({str(exc).splitlines()[0][:120]})",
                hint="make one with `carve profile MODEL -o FILE`",
            ) from None
        return cls.from_json(doc, where=str(path))

    def check(self, key: dict[str, Any], *, where: str = "the latency table") -> None:
        """Refuse a table measured for another model or under other settings, naming the first difference."""
        hint = "profile this model with these settings: `carve profile MODEL --backend ... -o FILE`"
        if self.key.get("model") != key.get("model"):
            raise CarveError(f"{where} was measured for another model (or one whose structure changed)", hint=hint)
        for k in ("backend", "device", "threads", "batch", "precision"):
            if self.key.get(k) != key.get(k):
                raise CarveError(f"{where} was measured with {k}={self.key.get(k)}, not {k}={key.get(k)}", hint=hint)

    def bind(self, analysis: ChannelAnalysis) -> BoundTable:
        if self.key.get("model") != structure_fingerprint(analysis.model):
            raise CarveError(
                "the latency table was measured for another model (or one whose structure changed)",
                hint="profile the model you prune: `carve profile MODEL -o FILE`",
            )
        return BoundTable(self, analysis)


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any, *, low: float = 0.0, strict: bool = False, high: float = math.inf) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= high
    return ok and (v > low if strict else v >= low)


# physical bounds: a narrower layer is not a thousand times slower than at full width, a group's subgraph not a
# thousand times the model, a model not slower than a day per inference (a table beyond them is not a measurement)
RATIO_MAX = SHARE_MAX = 1e3
MODEL_MS_MAX = 8.64e7


_GROUP_FIELDS = {"group", "slices", "candidates", "ratio", "share", "nodes", "measured_as"}


class _Bad:
    """A schema error of one table file: one line naming the file and the field, and how to get a good table."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self, what: str) -> CarveError:
        return CarveError(f"{self.where}: {what}", hint="make the table again with `carve profile MODEL -o FILE`")


def check_table(doc: dict, where: str) -> None:
    """The latency table's schema, at the door: every field present with its type and range (finite positive
    latencies and ratios, candidates that fit their slices), or one line naming the field (issue 21)."""
    bad = _Bad(where)
    _check_key(doc.get("key"), bad)
    if not _is_num(doc.get("model_ms"), strict=True, high=MODEL_MS_MAX):
        raise bad(f"`model_ms` must be a finite latency above 0, not {doc.get('model_ms')!r}")
    if not _is_num(doc.get("scale", 1.0), strict=True, high=SHARE_MAX):
        raise bad(f"`scale` must be a finite number above 0, not {doc.get('scale')!r}")
    for k in ("error", "profile"):
        if not isinstance(doc.get(k, {}), dict):
            raise bad(f"`{k}` must be a mapping")
    groups = doc.get("groups")
    if not isinstance(groups, list):
        raise bad("`groups` must be a list")
    for i, g in enumerate(groups):
        _check_group(g, f"groups[{i}]", bad)
    inter = doc.get("interactions", [])
    if not isinstance(inter, list) or not all(_is_interaction(t) for t in inter):
        raise bad("`interactions` must be a list of [group, group, finite share]")


def _check_key(key: Any, bad: _Bad) -> None:
    if not isinstance(key, dict) or not isinstance(key.get("model"), str):
        raise bad("`key` must be a mapping naming the model's structure (`key.model`)")
    for k in ("backend", "device", "precision"):
        if not isinstance(key.get(k), str):
            raise bad(f"`key.{k}` must be a string, not {key.get(k)!r}")
    for k in ("threads", "batch"):
        if not _is_int(key.get(k), 1):
            raise bad(f"`key.{k}` must be a positive whole number, not {key.get(k)!r}")


def _is_interaction(t: Any) -> bool:
    if not (isinstance(t, list) and len(t) == 3):
        return False
    return _is_int(t[0]) and _is_int(t[1]) and _is_num(t[2], low=-SHARE_MAX, high=SHARE_MAX)


def _check_group(g: Any, at: str, bad: _Bad) -> None:
    if not isinstance(g, dict) or not {"group", "slices", "candidates", "ratio", "share"} <= set(g):
        raise bad(f"{at} must have group, slices, candidates, ratio and share")
    if set(g) - _GROUP_FIELDS:
        raise bad(f"{at} has unknown field {sorted(set(g) - _GROUP_FIELDS)[0]!r}")
    if not _is_int(g["group"]) or not (g.get("measured_as") is None or _is_int(g["measured_as"])):
        raise bad(f"{at}.group must be a group number")
    slices = g["slices"]
    if not isinstance(slices, list) or not slices or not all(_is_int(n, 1) for n in slices):
        raise bad(f"{at}.slices must be a non-empty list of positive channel counts")
    _check_candidates(g["candidates"], slices, at, bad)
    ratio = g["ratio"]
    if not isinstance(ratio, list) or len(ratio) != len(g["candidates"]):
        raise bad(f"{at}.ratio must be one latency ratio per candidate")
    if not all(_is_num(r, strict=True, high=RATIO_MAX) for r in ratio):
        raise bad(f"{at}.ratio must hold latency ratios in (0, {RATIO_MAX:g}]; got {ratio[:4]!r}...")
    if not _is_num(g["share"], high=SHARE_MAX):
        raise bad(f"{at}.share must be a finite fraction, not {g['share']!r}")
    nodes = g.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise bad(f"{at}.nodes must be a list of node names")


def _check_candidates(cands: Any, slices: list[int], at: str, bad: _Bad) -> None:
    if not isinstance(cands, list) or not cands:
        raise bad(f"{at}.candidates must be a non-empty list")
    for c in cands:
        if not (isinstance(c, list) and len(c) == len(slices) and all(_is_int(k) for k in c)):
            raise bad(f"{at}.candidates: {c!r} is not kept units per slice ({len(slices)} whole numbers)")
        if any(k > n for k, n in zip(c, slices)):
            raise bad(f"{at}.candidates: {c!r} keeps more than the slices {slices} hold")


class BoundTable:
    """A table bound to the analysis of the model it was measured on: predicts the latency of a removal mask (the
    :class:`carve.pipeline.pruning.allocator.Costs` of kind ``latency`` the planner and the knapsack use)."""

    kind = "latency"

    def __init__(self, table: LatencyTable, analysis: ChannelAnalysis) -> None:
        self.table, self.analysis = table, analysis
        self.reference_ms = table.model_ms
        self.error = table.stated_error
        self.entries: dict[int, GroupTable] = {}
        for g in table.groups:
            if g.group >= len(analysis.groups) or [len(s) for s in analysis.groups[g.group].slices] != g.slices:
                raise CarveError(f"the latency table's group {g.group} does not match this model's channel groups")
            self.entries[g.group] = g
        # the calibrated terms: each group's share and each pair's tau, times the table's scale
        self.shares = {gid: g.share * table.scale for gid, g in self.entries.items()}
        self.pairs = [(int(a), int(b), float(t) * table.scale) for a, b, t in table.interactions]

    def factors(self, removed: np.ndarray) -> dict[int, float]:
        """F_g per tabled group for a removal mask."""
        out = {}
        for gid, entry in self.entries.items():
            slices = self.analysis.groups[gid].slices
            out[gid] = entry.factor([len(sl) - int(removed[sl].sum()) for sl in slices])
        return out

    def predict_factors(self, f: dict[int, float]) -> float:
        return bilinear_ratio(self.shares, self.pairs, f)

    def predict_kept(self, kept: dict[int, list[int]]) -> float:
        """The same from kept units per slice of the groups given (the others whole)."""
        return self.predict_factors({gid: self.entries[gid].factor(k) for gid, k in kept.items()})

    def predict(self, removed: np.ndarray) -> float:
        """Predicted latency of the model pruned by ``removed``, as a fraction of the original's."""
        return self.predict_factors(self.factors(np.asarray(removed, dtype=bool)))


# -- keys and the cache ---------------------------------------------------------------------------------------------


def structure_fingerprint(model: Model | onnx.ModelProto) -> str:
    """A hash of what decides latency: nodes (names, ops, attributes, wiring), input shapes, constant shapes and
    small integer constants' values (shapes, pads), but not weights (float values): a repaired or fine-tuned model
    keeps its table."""
    proto = model.proto if isinstance(model, Model) else model
    h = hashlib.sha256()
    g = proto.graph
    for n in g.node:
        h.update(f"{n.name}|{n.op_type}|{n.domain}|{list(n.input)}|{list(n.output)}".encode())
        for a in n.attribute:
            h.update(a.SerializeToString())
    for vi in list(g.input) + list(g.output):
        h.update(vi.SerializeToString())
    for t in g.initializer:
        h.update(f"{t.name}|{t.data_type}|{list(t.dims)}".encode())
        if t.data_type not in _FLOATS and int(np.prod(t.dims, dtype=np.int64)) <= 64:
            h.update(t.SerializeToString())  # shapes, pads, axes
    for o in proto.opset_import:
        h.update(f"{o.domain}:{o.version}".encode())
    return h.hexdigest()[:20]


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide kernels (and carve's own)."""
    out = {"carve": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine(device: str) -> str:
    """What the table was measured on: the CPU model (and core count), or the GPU's name."""
    if device != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except ImportError:
            pass
        return f"{device} (unnamed)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def table_key(
    model: Model | onnx.ModelProto,
    *,
    backend: str,
    device: str,
    threads: int,
    batch: int,
    precision: str,
    step: int,
) -> dict[str, Any]:
    """Everything a table's validity depends on."""
    gpu_side = backend in ("trt", "torch-cuda") or device != "cpu"
    return {
        "schema": SCHEMA,
        "model": structure_fingerprint(model),
        "backend": backend,
        "device": device,
        "machine": machine("cuda" if gpu_side else "cpu"),
        "threads": int(threads),
        "batch": int(batch),
        "precision": precision,
        "step": int(step),
        "versions": library_versions(),
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    base = os.environ.get("CARVE_CACHE") or Path.home() / ".cache" / "carve"
    return Path(base) / "latency"


def cached(key: dict[str, Any]) -> LatencyTable | None:
    """The cached table for ``key``, or None (also when the file is unreadable: it is then measured again)."""
    path = cache_dir() / f"{key_digest(key)}.json"
    if not path.is_file():
        return None
    try:
        table = LatencyTable.from_json(json.loads(path.read_text()), where=str(path))
    except (CarveError, OSError, ValueError, TypeError, KeyError) as exc:
        from carve.pipeline.errors import first_line, warn

        msg = exc.message.removeprefix(f"{path}: ") if isinstance(exc, CarveError) else first_line(exc)
        warn(f"{path}: a damaged cached latency table ({msg[:160]}); it is measured again")
        return None
    return table if table.key == key else None


def store(table: LatencyTable) -> Path | None:
    """Put ``table`` in the cache (best effort: an unwritable cache is not an error)."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        return table.save(d / f"{key_digest(table.key)}.json")
    except OSError:
        return None
