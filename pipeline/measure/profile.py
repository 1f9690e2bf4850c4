"""Profiling a model into a latency table (:mod:`carve.pipeline.measure.latency_table`): ``carve profile``.

For every channel group that has prunable units:

1. its subgraph (:func:`carve.pipeline.graph.subgraph.group_nodes`, :func:`~carve.pipeline.graph.subgraph.extract`): the
layers
   the group's width changes, as a model of its own; identical subgraphs (the repeated blocks of a ResNet stage) are
   timed once;
2. candidate widths per slice (:func:`candidate_widths`: every multiple of ``step`` in the top half, coarser below),
   and for each a copy of the subgraph physically pruned to it by carve's own surgery;
3. timing on the target backend through the runners and the interleaved round-robin of :mod:`carve.pipeline.measure.ab`:
   first the whole model and every distinct subgraph at full width together (each subgraph's share of the whole
   model), then per subgraph its candidates against its full width (the staircase), in chunks.

Then a validation: a few whole pruned models (every group near a common fraction of its width) are measured against
the original in interleaved rounds and compared with the table's prediction; the worst relative error is the table's
stated error. The result is cached on disk (:func:`carve.pipeline.measure.latency_table.cached`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis, analyse
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.model import Model, tensor_nbytes
from carve.pipeline.graph.plan import Plan
from carve.pipeline.graph.subgraph import extract, group_nodes
from carve.pipeline.graph.surgery import prune
from carve.pipeline.measure.ab import interleave_many
from carve.pipeline.measure.backends import EngineConfig
from carve.pipeline.measure.latency_table import BoundTable, GroupTable, LatencyTable, cached, store, table_key
from carve.pipeline.measure.runners import LocalRunner
from carve.pipeline.progress import Progress

VALIDATION_FRACTIONS = (0.75, 0.5, 0.625, 0.875, 0.375)
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass
class ProfileSettings:
    """How a table is measured. ``backend`` .. ``precision`` and ``step`` are part of the table's key; the rest says
    how hard to look (more rounds: tighter ratios, longer profiling)."""

    backend: str = "ort"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    precision: str = "fp32"
    step: int = 8  # candidate widths are multiples of this near the top
    rounds: int = 7
    min_round_ms: float = 5.0  # each engine's share of a round
    warmup_ms: float = 10.0
    chunk: int = 16  # engines alive at once
    chunk_mb: float = 1024.0  # and at most about this much weight memory in them
    validate: int = 3  # whole pruned models measured to state the table's error
    clock: str = "auto"  # CPU with one thread: the thread's CPU time (see EngineConfig.cpu_clock)
    cache: bool = True

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            batch=self.batch, threads=self.threads, device=self.device, precision=self.precision, clock=self.clock
        )

    def key(self, model: Model) -> dict:
        return table_key(
            model,
            backend=self.backend,
            device=self.device,
            threads=self.threads,
            batch=self.batch,
            precision=self.precision,
            step=self.step,
        )


def candidate_widths(n: int, step: int = 8, *, top_points: int = 24) -> list[int]:
    """Kept widths to time for a slice of ``n`` channels, widest first: ``n``; every multiple of ``step`` in the top
    half (of a coarser power-of-two multiple when that would be more than ``top_points``); multiples of twice that in
    the second quarter; ``step`` times powers of two below. Slices of at most ``step`` channels try every width."""
    if n <= step:
        return list(range(n, 0, -1))
    s = step
    while (n / 2) / s > top_points:
        s *= 2
    widths = {n}
    widths.update(range(n // s * s, (n + 1) // 2 - 1, -s))
    widths.update(w for w in range(2 * s, (n + 1) // 2, 2 * s) if w >= n / 4)
    k = step
    while k < n / 2:
        widths.add(k)
        k *= 2
    return sorted((w for w in widths if 0 < w <= n), reverse=True)


def group_candidates(slices: list[int], frozen: list[int], step: int, *, combinations: int = 48) -> list[list[int]]:
    """Kept units per slice at each candidate width of a group, widest (full) first. A group of several slices (a
    residual stream whose later stages add channels) tries every combination of its slices' widths when there are at
    most ``combinations`` of them; otherwise a common fraction set by the largest slice, each slice aligned up to
    ``step``. Every slice keeps at least its frozen units."""
    per_slice = [
        sorted({min(n, max(w, f)) for w in candidate_widths(n, step)}, reverse=True) for n, f in zip(slices, frozen)
    ]
    if len(slices) > 1 and math.prod(len(w) for w in per_slice) <= combinations:
        combos = [list(c) for c in itertools.product(*per_slice)]
        return sorted(combos, key=lambda c: (-sum(c), c))
    big = int(np.argmax(slices))
    out: list[list[int]] = []
    for w in candidate_widths(slices[big], step):
        frac = w / slices[big]
        kept = []
        for n, f in zip(slices, frozen):
            k = math.ceil(n * frac - 1e-9) if n <= step else math.ceil(n * frac / step - 1e-9) * step
            kept.append(int(min(n, max(k, f, 1))))
        if kept not in out:
            out.append(kept)
    return out


class GroupSubgraph:
    """One group's layers as a model of their own, with its units mapped to the original's slices."""

    def __init__(self, model: Model, analysis: ChannelAnalysis, gid: int, frozen: np.ndarray) -> None:
        self.gid = gid
        self.nodes = group_nodes(analysis, gid)
        self.proto = extract(model, self.nodes, name=f"group{gid}")
        self.model = Model(self.proto)
        self.analysis = analyse(self.model)
        group = analysis.groups[gid]
        self.sizes = [len(s) for s in group.slices]
        self.frozen_counts = [int(frozen[s].sum()) for s in group.slices]
        sub_unit = _unit_map(analysis, self.analysis, group.units)
        # per slice: the sub-model's units that may go, in the order they are removed (last first)
        self.removable = []
        for sl in group.slices:
            units = [sub_unit[int(u)] for u in sl if not frozen[int(u)]]
            if any(self.analysis.unit_frozen[u] for u in units):
                raise CarveError(f"group {gid}: its channels freeze when its layers are cut out of the model")
            self.removable.append(units[::-1])
        self.signature = _signature(self.proto, self.sizes, self.frozen_counts)

    def variant(self, kept: list[int]) -> onnx.ModelProto:
        removed = np.zeros(self.analysis.n_units, dtype=bool)
        for units, n, k in zip(self.removable, self.sizes, kept):
            removed[units[: n - k]] = True
        if not removed.any():
            return self.proto
        return prune(self.model, Plan(self.analysis, removed), verify=False).proto


def profile(
    model: Model,
    settings: ProfileSettings | None = None,
    *,
    frozen: np.ndarray | None = None,
    progress: Progress | None = None,
) -> LatencyTable:
    """The latency table of ``model`` (a loaded, prepared Model) under ``settings``: from the cache when a table
    with the same key is there, else measured (and cached)."""
    settings = settings or ProfileSettings()
    key = settings.key(model)
    if settings.cache:
        hit = cached(key)
        if hit is not None:
            if progress:
                progress("profile: latency table from the cache")
            return hit
    t0 = time.time()
    load0 = _load()
    analysis = analyse(model)
    frozen = analysis.unit_frozen if frozen is None else frozen | analysis.unit_frozen
    gids = [g.id for g in analysis.groups if (~frozen[g.units]).any()]
    if not gids:
        raise CarveError("nothing to profile: the model has no prunable channels", hint="`carve inspect --groups`")
    config = settings.engine_config()
    with tempfile.TemporaryDirectory(prefix="carve-profile-") as tmp:
        tmp = Path(tmp)
        whole = tmp / "model.onnx"
        onnx.save_model(model.proto, str(whole))
        subs: dict[str, GroupSubgraph] = {}
        rep_of: dict[int, GroupSubgraph] = {}
        for k, gid in enumerate(gids):
            if progress:
                progress("profile: cutting out groups", k + 1, len(gids))
            sub = GroupSubgraph(model, analysis, gid, frozen)
            rep_of[gid] = subs.setdefault(sub.signature, sub)
        reps = list(subs.values())
        original = LocalRunner(settings.backend, whole, config)
        try:
            shares, model_ms = _shares(original, _nbytes(model.proto), reps, settings, tmp, progress)
            staircases = {}
            for k, sub in enumerate(reps):
                if progress:
                    progress(
                        "profile: timing widths of subgraphs", k + 1, len(reps), group=sub.gid, nodes=len(sub.nodes)
                    )
                staircases[sub.gid] = _staircase(sub, settings, tmp)
            groups = []
            for gid in gids:
                rep = rep_of[gid]
                cands, ratio = staircases[rep.gid]
                groups.append(
                    GroupTable(
                        group=gid,
                        slices=[len(s) for s in analysis.groups[gid].slices],
                        candidates=cands,
                        ratio=ratio,
                        share=shares[rep.gid],
                        nodes=group_nodes(analysis, gid),
                        measured_as=None if rep.gid == gid else rep.gid,
                    )
                )
            table = LatencyTable(key=key, model_ms=model_ms, groups=groups)
            table.interactions = interactions(analysis, table)
            if settings.validate:
                table.error = validate(model, analysis, table, original, settings, tmp, progress)
        finally:
            original.close()
    table.profile = {
        "seconds": round(time.time() - t0, 1),
        "groups": len(gids),
        "subgraphs_timed": len(reps),
        "candidates_timed": sum(len(staircases[s.gid][0]) for s in reps),
        "rounds": settings.rounds,
        "clock": "thread-cpu" if settings.engine_config().cpu_clock() else "wall",
        "min_round_ms": settings.min_round_ms,
        "load_before": load0,
        "load_after": _load(),
    }
    if settings.cache:
        store(table)
    return table


def _shares(
    original: LocalRunner,
    whole_bytes: int,
    reps: list[GroupSubgraph],
    settings: ProfileSettings,
    tmp: Path,
    progress: Progress | None,
):
    """Each distinct subgraph's full-width latency / the whole model's, measured in the same rounds (in chunks, the
    whole model in each); and the whole model's median latency in ms."""
    shares: dict[int, float] = {}
    model_times = []
    done = 0
    for chunk in _chunks(reps, [_nbytes(s.proto) for s in reps], settings, reserved=whole_bytes):
        done += len(chunk)
        if progress:
            progress("profile: timing subgraphs against the whole model", done, len(reps))
        runners = [original]
        try:
            for sub in chunk:
                runners.append(_runner(sub.proto, settings, tmp / f"full{sub.gid}.onnx"))
            run = _robin(runners, settings)
            ratios = np.median(run.ratios(0), axis=0)
            model_times.append(np.concatenate(run.times[0]))
            for sub, r in zip(chunk, ratios[1:]):
                shares[sub.gid] = float(r)
        finally:
            for r in runners[1:]:
                r.close()
    return shares, float(np.median(np.concatenate(model_times))) * 1e3


def _staircase(sub: GroupSubgraph, settings: ProfileSettings, tmp: Path) -> tuple[list[list[int]], list[float]]:
    """The subgraph's latency at each candidate width relative to full width."""
    cands = group_candidates(sub.sizes, sub.frozen_counts, settings.step)
    ratio = [1.0] * len(cands)
    rest = list(range(1, len(cands)))
    full = _nbytes(sub.proto)
    for idx in _chunks(rest, [full] * len(rest), settings, reserved=full):
        runners = []
        try:
            runners.append(_runner(sub.proto, settings, tmp / f"g{sub.gid}_full.onnx"))
            for i in idx:
                runners.append(_runner(sub.variant(cands[i]), settings, tmp / f"g{sub.gid}_{i}.onnx"))
            med = np.median(_robin(runners, settings).ratios(0), axis=0)
            for i, r in zip(idx, med[1:]):
                ratio[i] = float(r)
        finally:
            for r in runners:
                r.close()
    return cands, ratio


def _chunks(items: list, sizes: list[int], settings: ProfileSettings, *, reserved: int = 0) -> list[list]:
    """Consecutive runs of ``items`` of at most ``chunk - 1`` items (one engine of each round-robin is the reference)
    and about ``chunk_mb`` of weights: engines alive at once hold their weights."""
    budget = settings.chunk_mb * 2**20 - reserved
    out: list[list] = []
    cur: list = []
    used = 0
    for item, size in zip(items, sizes):
        if cur and (len(cur) >= max(1, settings.chunk - 1) or used + size > budget):
            out.append(cur)
            cur, used = [], 0
        cur.append(item)
        used += size
    if cur:
        out.append(cur)
    return out


def _nbytes(proto: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in proto.graph.initializer)


def _runner(proto: onnx.ModelProto, settings: ProfileSettings, path: Path) -> LocalRunner:
    onnx.save_model(proto, str(path))
    return LocalRunner(settings.backend, path, settings.engine_config())


def _robin(runners, settings: ProfileSettings):
    return interleave_many(
        runners,
        rounds=settings.rounds,
        min_round_s=settings.min_round_ms / 1000,
        warmup_s=settings.warmup_ms / 1000,
        size_each=True,
    )


def interactions(analysis: ChannelAnalysis, table: LatencyTable) -> list[list[float]]:
    """tau_gh for the layers that read group g and write group h (the bilinear term of the prediction).

    A group's measured saving t_g (1 - F_g) is spread over the layers of its subgraph in proportion to their work
    (MACs; output elements for MAC-free ops): layer n's part is s_gn of it. The layer's own latency t_n is estimated
    from how the saving grows with width: a subgraph's latency is a constant part (its inputs and outputs,
    framework overhead) plus a part that scales with the width, whose slope beta_g is fitted on the fast steps;
    t_n = the geometric mean of t_g beta_g s_gn and t_h beta_h s_hn. A layer that loses a fraction a of its time to
    g and b to h runs in (1 - a)(1 - b) of it, so tau_gh = sum_n (t_g s_gn)(t_h s_hn) / t_n, scaled by g's part of
    the layer's input channels when several groups feed it (a concatenation)."""
    model = analysis.model
    cost = model_cost(model)
    tabled = {g.group: g for g in table.groups}

    def work(name: str) -> float:
        node = model.nodes[name]
        macs = cost.nodes[name].macs if name in cost.nodes else 0
        if macs:
            return float(macs)
        return float(sum(np.prod([d or 1 for d in (model.shape(o) or (1,))[1:]]) for o in node.output if o))

    totals = {gid: sum(work(n) for n in g.nodes) for gid, g in tabled.items()}
    slopes = {gid: scalable_fraction(g) for gid, g in tabled.items()}
    pairs: dict[tuple[int, int], float] = {}
    seen: set[str] = set()
    for g in table.groups:
        for name in g.nodes:
            if name in seen:
                continue
            seen.add(name)
            node = model.nodes[name]
            ins = _groups_on(analysis, [i for i in node.input if i and i not in model.init])
            outs = _groups_on(analysis, [o for o in node.output if o])
            width_in = sum(ins.values())
            for a, na in ins.items():
                for b in outs:
                    if a == b or a in outs or b in ins or a not in tabled or b not in tabled:
                        continue
                    if not totals[a] or not totals[b]:
                        continue
                    w = work(name)
                    da, db = tabled[a].share * w / totals[a], tabled[b].share * w / totals[b]
                    t_n = float(np.sqrt(da * slopes[a] * db * slopes[b]))
                    if t_n > 0:
                        pairs[(a, b)] = pairs.get((a, b), 0.0) + da * db / t_n * na / width_in
    return [[a, b, round(t, 8)] for (a, b), t in sorted(pairs.items())]


def scalable_fraction(g: GroupTable) -> float:
    """beta: the part of a subgraph's latency that scales with the group's width, fitted as F = 1 - beta (1 - x) on
    the fast steps with kept fraction x >= 1/4 (clamped to [0.5, 1])."""
    tot = g.totals()
    fast = [i for i in g.fast() if tot[i] >= tot[0] / 4 and tot[i] < tot[0]]
    if not fast:
        return 1.0
    x = 1.0 - tot[fast] / tot[0]
    y = 1.0 - np.asarray(g.ratio)[fast]
    return float(np.clip((x * y).sum() / (x * x).sum(), 0.5, 1.0))


def _groups_on(analysis: ChannelAnalysis, tensors: list[str]) -> dict[int, int]:
    """Groups carried by the tensors, with how many channels of each."""
    out: dict[int, int] = {}
    for t in tensors:
        chan = analysis.tensors.get(t)
        if chan is None or not len(chan):
            continue
        gs, counts = np.unique(analysis.unit_group[analysis.unit_of[chan.ids]], return_counts=True)
        for g, c in zip(gs, counts):
            out[int(g)] = out.get(int(g), 0) + int(c)
    return out


def uniform_removal(analysis: ChannelAnalysis, table: LatencyTable, fraction: float) -> np.ndarray:
    """A removal mask with every tabled group at the fast step of its staircase nearest ``fraction`` of its width
    (the widths the ``latency`` allocator chooses from; for validation)."""
    removed = np.zeros(analysis.n_units, dtype=bool)
    frozen = analysis.unit_frozen
    for g in table.groups:
        tot = g.totals()
        fast = g.fast()
        kept = g.candidates[fast[int(np.argmin(np.abs(tot[fast] - fraction * tot[0])))]]
        for sl, k in zip(analysis.groups[g.group].slices, kept):
            prunable = [int(u) for u in sl if not frozen[u]]
            if len(sl) > k:
                removed[prunable[k - len(sl) :]] = True
    return removed


def validate(
    model: Model,
    analysis: ChannelAnalysis,
    table: LatencyTable,
    original: LocalRunner,
    settings: ProfileSettings,
    tmp: Path,
    progress: Progress | None = None,
) -> dict:
    """Measure whole pruned models (every group at the fast step nearest 3/4, then 1/2, then 5/8 ... of its width)
    against the original (interleaved, at least 15 rounds of 20 ms), calibrate the table on them, and state its error.

    The calibration is one scale s of the predicted change (P = 1 + s (P_raw - 1)), fitted by least squares through
    the origin (clipped to [0.5, 2]; 1 with fewer than two models) and stored as ``table.scale``. The stated error
    is each model's error under the scale fitted to the *other* models (leave one out), so it is not flattered by
    the fit; it is what ``stated_error`` reports."""
    bound = BoundTable(table, analysis)
    raw = []
    for k, fraction in enumerate(VALIDATION_FRACTIONS[: settings.validate]):
        if progress:
            progress("profile: validating the table on whole pruned models", k + 1, settings.validate)
        removed = uniform_removal(analysis, table, fraction)
        predicted = bound.predict(removed)
        pruned = prune(model, Plan(analysis, removed), verify=False)
        runner = _runner(pruned.proto, settings, tmp / f"validate{k}.onnx")
        precise = replace(settings, rounds=max(settings.rounds, 15), min_round_ms=max(settings.min_round_ms, 20.0))
        try:
            run = _robin([original, runner], precise)
        finally:
            runner.close()
        raw.append((fraction, predicted, float(np.median(run.ratios(0)[:, 1]))))

    def fit(points) -> float:
        den = sum((p - 1.0) ** 2 for _, p, _ in points)
        if den <= 1e-12:
            return 1.0
        return float(np.clip(sum((p - 1.0) * (m - 1.0) for _, p, m in points) / den, 0.5, 2.0))

    scale = fit(raw) if len(raw) >= 2 else 1.0
    table.scale = round(scale, 4)
    points = []
    for i, (fraction, p, m) in enumerate(raw):
        loo = fit(raw[:i] + raw[i + 1 :]) if len(raw) >= 2 else 1.0
        points.append(
            {
                "fraction": fraction,
                "predicted": round(1.0 + scale * (p - 1.0), 4),
                "predicted_uncalibrated": round(p, 4),
                "predicted_left_out": round(1.0 + loo * (p - 1.0), 4),
                "measured": round(m, 4),
                "error": round((1.0 + loo * (p - 1.0)) / m - 1.0, 4),
            }
        )
    errs = [abs(p["error"]) for p in points]
    return {
        "method": "whole pruned models (every group at the fast step nearest a common fraction of its width) "
        "measured against the original in interleaved rounds; the predicted change scaled by s fitted to them; "
        "error = predicted / measured latency ratio - 1 with s fitted to the other models (leave one out)",
        "scale": round(scale, 4),
        "points": points,
        "max_abs": round(max(errs), 4) if errs else None,
        "mean_abs": round(float(np.mean(errs)), 4) if errs else None,
    }


def _unit_map(analysis: ChannelAnalysis, sub: ChannelAnalysis, units: np.ndarray) -> dict[int, int]:
    """Original unit -> the sub-model's unit holding the same element (same source node, same channel)."""
    _, first = np.unique(analysis.unit_of, return_index=True)
    by_name = {(s.name, s.kind): s for s in sub.sources}
    out = {}
    for u in units:
        e = int(first[int(u)])
        src = analysis.sources[int(analysis.element_source[e])]
        twin = by_name.get((src.name, src.kind))
        if twin is None:
            raise CarveError(f"group of unit {int(u)}: its source {src.name!r} is not in its cut-out subgraph")
        out[int(u)] = int(sub.unit_of[twin.start + e - src.start])
    return out


def _signature(proto: onnx.ModelProto, sizes: list[int], frozen: list[int]) -> str:
    """Structure of a subgraph with tensor names replaced by their order of appearance: equal for identical blocks."""
    names: dict[str, str] = {}
    init = {t.name: t for t in proto.graph.initializer}

    def canon(t: str) -> str:
        return names.setdefault(t, f"t{len(names)}") if t else ""

    h = hashlib.sha256(json.dumps([sizes, frozen]).encode())
    for vi in proto.graph.input:
        canon(vi.name)
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
        h.update(f"in|{dims}|{vi.type.tensor_type.elem_type}".encode())
    for n in proto.graph.node:
        h.update(f"{n.op_type}|{n.domain}|{[canon(i) for i in n.input]}|{[canon(o) for o in n.output]}".encode())
        for a in sorted(n.attribute, key=lambda a: a.name):
            h.update(a.SerializeToString())
        for i in n.input:
            t = init.get(i)
            if t is not None:
                h.update(f"{t.data_type}|{list(t.dims)}".encode())
                if t.data_type not in _FLOATS and int(np.prod(t.dims, dtype=np.int64)) <= 64:
                    h.update(onnx.numpy_helper.to_array(t).tobytes())  # shapes, pads, axes: structure
    for o in proto.graph.output:
        h.update(f"out|{canon(o.name)}".encode())
    return h.hexdigest()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
