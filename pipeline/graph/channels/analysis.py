"""Channel dependency analysis: which channels of an ONNX graph are coupled, which can be removed, and why not.

Model (docs/channels.md has a picture):

* An **element** is one output channel of something that creates channels: a producer (Conv, ConvTranspose, Gemm,
  MatMul with a constant weight), a depthwise conv's filter (a *member* of its input channel), a constant channel that a
  ``Pad`` or a ``Concat`` with a constant adds, or a channel of a graph input / of an op carve does not understand.
* Every tensor that carries channels holds, per index along its channel axis, the element it came from
  (:class:`~carve.pipeline.graph.channels.elements.Chan`). Walking the graph in topological order, one handler per op
  type (:mod:`carve.pipeline.graph.channels.handlers`) computes the output vectors from the input vectors and records
    - **unions**: elements that must be removed together (residual ``Add``, SE gating ``Mul``, depthwise in/out),
    - **freezes**: elements that must stay, with a reason (graph inputs/outputs, unknown ops, tied weights, ...),
    - **slices**: which constant is cut along which axis by which elements (weights, biases, BN statistics, ...),
    - **fixes**: attributes and shape constants that depend on channel counts (:mod:`.fixes`).
* Unions are solved once, at the end, as connected components (scipy). A **unit** is a set of coupled elements: it is
  removed as a whole. A **group** is a set of units that belong to the same producers (one coupled channel space, e.g.
  a whole residual stream). Inside a group, units that appear in exactly the same tensors form a **slice**: pruning
  ratios and channel alignment apply per slice, so every tensor keeps the same fraction and an aligned width.

Handlers never guess: whatever touches a channel axis in a way they cannot follow freezes the elements involved.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from carve.pipeline.errors import UnsupportedModelError
from carve.pipeline.graph.channels.elements import Block, Chan, Group, Kind, SliceRecord, Source, StatRecord
from carve.pipeline.graph.channels.fixes import Fix
from carve.pipeline.graph.channels.handlers import dispatch, q
from carve.pipeline.graph.channels.state import ATTENTION_MODES, CONV_GROUP_MODES, Analyser
from carve.pipeline.graph.model import Model, control_flow_nodes, outer_names


class ChannelAnalysis:
    """The result of :func:`analyse`. Element- and unit-level views, groups, slices and the surgery recipe."""

    def __init__(self, model: Model, a: Analyser) -> None:
        self.model = model
        self.fingerprint = fingerprint(model)
        self.sources: list[Source] = a.sources
        self.n_elements = a.n
        self.slice_records: list[SliceRecord] = a.slices
        self.fixes: list[Fix] = a.fixes
        self.stat_records: list[StatRecord] = a.stats
        self.contract_records = a.contracts
        self.attention = a.attention
        self.conv_groups = a.conv_groups
        # tensors whose channels lie on one axis; blocks (channels split over several axes: attention heads) apart
        self.tensors: dict[str, Chan] = {k: v for k, v in a.chan.items() if isinstance(v, Chan)}
        self.blocks: dict[str, Block] = {k: v for k, v in a.chan.items() if isinstance(v, Block)}
        self._solve(a)

    # -- solving -------------------------------------------------------------------------------------------------
    def _solve(self, a: Analyser) -> None:
        n = self.n_elements
        if a.union_pairs:
            src = np.concatenate([p[0] for p in a.union_pairs])
            dst = np.concatenate([p[1] for p in a.union_pairs])
        else:
            src = dst = np.zeros(0, dtype=np.int64)
        self.unit_of: np.ndarray = components(n, src, dst)
        self.n_units = int(self.unit_of.max()) + 1 if n else 0

        self.element_source = np.zeros(n, dtype=np.int64)
        for i, s in enumerate(self.sources):
            self.element_source[s.start : s.start + s.count] = i

        reasons: dict[int, list[str]] = defaultdict(list)
        for ids, reason in a.frozen:
            for u in np.unique(self.unit_of[ids]):
                if reason not in reasons[u]:
                    reasons[int(u)].append(reason)
        self._check_shared_constants(reasons)
        self.unit_reasons: dict[int, list[str]] = dict(reasons)
        self.unit_frozen = np.zeros(self.n_units, dtype=bool)
        self.unit_frozen[list(reasons)] = True

        self.unit_inexact: dict[int, list[str]] = defaultdict(list)
        for ids, reason in a.inexact:
            for u in np.unique(self.unit_of[ids]):
                if reason not in self.unit_inexact[int(u)]:
                    self.unit_inexact[int(u)].append(reason)
        self.unit_inexact = dict(self.unit_inexact)

        # groups: sources linked through shared units
        self._build_groups(a)

    def _check_shared_constants(self, reasons: dict[int, list[str]]) -> None:
        """A constant cut by several nodes must be cut identically by all of them, and read by no one else."""
        by_tensor: dict[str, list[SliceRecord]] = defaultdict(list)
        for r in self.slice_records:
            by_tensor[r.tensor].append(r)
        for tensor, recs in by_tensor.items():
            readers = {n.name for n in self.model.consumers.get(tensor, [])}
            slicers = {r.node for r in recs}
            problem = None
            if readers - slicers:
                problem = f"constant {tensor!r} is also read by {sorted(readers - slicers)[0]!r}, which does not cut it"
            elif len(slicers) > 1:
                axes_by_node = {n: {r.axis for r in recs if r.node == n} for n in slicers}
                same_axes = len({frozenset(v) for v in axes_by_node.values()}) == 1
                same_units = all(
                    len(r.ids) == len(q.ids) and np.array_equal(self.unit_of[r.ids], self.unit_of[q.ids])
                    for r in recs
                    for q in recs
                    if r.axis == q.axis
                )
                if not (same_axes and same_units):
                    problem = f"weight {tensor!r} is shared by nodes {', '.join(sorted(slicers))}"
            if problem:
                for r in recs:
                    for u in np.unique(self.unit_of[r.ids]):
                        if problem not in reasons[int(u)]:
                            reasons[int(u)].append(problem)

    def _build_groups(self, a: Analyser) -> None:
        ns = len(self.sources)
        # link each unit to the sources of its elements; groups are connected components of that bipartite graph
        labels = components(ns + self.n_units, self.element_source, ns + self.unit_of)
        self.unit_group = _renumber(labels[ns:])
        n_groups = int(self.unit_group.max()) + 1 if self.n_units else 0
        # slices: units of a group that appear in exactly the same tensors
        signature: dict[int, list] = defaultdict(list)
        for t_idx, chan in enumerate(self.tensors.values()):
            for u in np.unique(self.unit_of[chan.ids]):
                signature[int(u)].append(t_idx)
        # ... and in the same members of lockstep sets (each head of an attention is a slice of its own)
        lockstep = self._lockstep_members(a)
        for k, members in enumerate(lockstep):
            for j, m in enumerate(members):
                for u in m:
                    signature[int(u)].append((k, j))
        spans = self._unit_spans(a)
        groups: list[Group] = []
        source_units: dict[int, set[int]] = defaultdict(set)
        for s_idx, s in enumerate(self.sources):
            for u in np.unique(self.unit_of[s.start : s.start + s.count]):
                source_units[int(self.unit_group[u])].add(s_idx)
        for gid in range(n_groups):
            units = np.flatnonzero(self.unit_group == gid)
            by_sig: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for u in units:
                by_sig[tuple(signature.get(int(u), ()))].append(int(u))
            slices = [np.array(v, dtype=np.int64) for v in by_sig.values()]
            slices.sort(key=lambda s: int(s[0]))
            srcs = [self.sources[i].name for i in sorted(source_units[gid])]
            inexact = list(dict.fromkeys(r for u in units for r in self.unit_inexact.get(int(u), ())))
            groups.append(Group(gid, units, srcs, slices, [_gcd(spans[sl]) for sl in slices], inexact))
        for members in lockstep:
            gid = int(self.unit_group[members[0][0]])
            groups[gid].lockstep.append(members)
        self.groups = groups

    def _lockstep_members(self, a: Analyser) -> list[list[np.ndarray]]:
        """Lockstep sets as unit arrays: atomic members (one unit: a whole head) and duplicates dropped, sets of
        fewer than two members dropped."""
        out, seen = [], set()
        for members in a.lockstep:
            units = []
            keys = set()
            for m in members:
                u = np.unique(self.unit_of[m])
                key = tuple(u.tolist())
                if len(u) > 1 and key not in keys:
                    keys.add(key)
                    units.append(u)
            key = tuple(sorted(keys))
            if len(units) > 1 and key not in seen:
                seen.add(key)
                out.append(units)
        return out

    def _unit_spans(self, a: Analyser) -> np.ndarray:
        """Channels each unit spans (the gcd of the hints of its elements; 1 without hints)."""
        spans = np.zeros(self.n_units, dtype=np.int64)
        for ids, n in a.spans:
            for u in np.unique(self.unit_of[ids]):
                spans[u] = math.gcd(int(spans[u]), n)
        spans[spans == 0] = 1
        return spans

    # -- queries ---------------------------------------------------------------------------------------------------
    def units_of_tensor(self, name: str) -> np.ndarray | None:
        chan = self.tensors.get(name)
        return None if chan is None else self.unit_of[chan.ids]

    def producers(self, kinds: tuple[Kind, ...] = (Kind.OUT, Kind.MEMBER)) -> Iterator[Source]:
        return (s for s in self.sources if s.kind in kinds)

    def source_units(self, source: Source) -> np.ndarray:
        return self.unit_of[source.start : source.start + source.count]

    def filters(self, source: Source) -> np.ndarray:
        """The filters of a producer as a 2-D array: one row per output channel (element)."""
        w = self.model.array(source.weight)
        w = np.moveaxis(w, source.axis, 0)
        return w.reshape(w.shape[0], -1)

    def unit_scores(self, element_scores: np.ndarray) -> np.ndarray:
        """Sum element scores into unit scores (NaN = not scored, counts as 0)."""
        s = np.nan_to_num(np.asarray(element_scores, dtype=np.float64), nan=0.0)
        return np.bincount(self.unit_of, weights=s, minlength=self.n_units)

    def frozen_reasons(self, unit: int) -> list[str]:
        return self.unit_reasons.get(int(unit), [])

    def inexact_reasons(self, unit: int) -> list[str]:
        """Why removing ``unit`` is not exact (it changes a LayerNorm's statistics); empty when it is."""
        return self.unit_inexact.get(int(unit), [])

    def inexact_units(self, removed: np.ndarray) -> np.ndarray:
        """The units of a removal mask whose removal is not exact."""
        idx = np.flatnonzero(removed)
        return np.array([u for u in idx if int(u) in self.unit_inexact], dtype=np.int64)

    def prunable_units(self) -> np.ndarray:
        return np.flatnonzero(~self.unit_frozen)

    def summary(self) -> dict:
        out = [s for s in self.sources if s.kind == Kind.OUT]
        n_out = sum(s.count for s in out)
        frozen_out = sum(int(self.unit_frozen[self.source_units(s)].sum()) for s in out)
        reasons: dict[str, int] = defaultdict(int)
        for rs in self.unit_reasons.values():
            reasons[reason_kind(rs[0])] += 1
        inexact = [g for g in self.groups if g.inexact and not self.unit_frozen[g.units].all()]
        return {
            "channels": n_out,
            "prunable_channels": n_out - frozen_out,
            "frozen_channels": frozen_out,
            "prunable_fraction": (n_out - frozen_out) / n_out if n_out else 0.0,
            "units": self.n_units,
            "prunable_units": int((~self.unit_frozen).sum()),
            "groups": len(self.groups),
            "inexact_groups": len(inexact),
            "attention": self.attention,
            "conv_groups": self.conv_groups,
            "frozen_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        }


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on ``n`` nodes given as edge arrays; labels 0.. in order of first
    appearance."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    adjacency = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(adjacency, directed=False)
    return _renumber(labels.astype(np.int64))


def _renumber(labels: np.ndarray) -> np.ndarray:
    if not len(labels):
        return labels
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def reason_kind(reason: str) -> str:
    return reason.split("'")[0].split("(")[0].strip().rstrip(":")


def fingerprint(model: Model) -> tuple:
    g = model.graph
    return (
        tuple((n.name, n.op_type) for n in g.node),
        tuple((t.name, tuple(t.dims)) for t in g.initializer),
    )


def analyse(model: Model, *, attention: str = "heads", conv_groups: str = "whole") -> ChannelAnalysis:
    """Analyse the channels of a prepared model (:func:`carve.pipeline.graph.load`).

    ``attention`` chooses the units of an attention: ``heads`` (whole heads: Q, K and V channels of a head and the
    output projection's rows it feeds) or ``width`` (per-head widths: a Q/K channel pair, or a V channel with its
    output-projection row, the same number in every head). ``conv_groups`` chooses the units of a grouped (not
    depthwise) conv: ``whole`` (whole groups: the ``group`` attribute shrinks) or ``width`` (one position of every
    group: equal widths in every group)."""
    if attention not in ATTENTION_MODES:
        raise UnsupportedModelError(
            f"unknown attention mode {attention!r}", hint=f"choose one of {', '.join(ATTENTION_MODES)}"
        )
    if conv_groups not in CONV_GROUP_MODES:
        raise UnsupportedModelError(
            f"unknown conv_groups mode {conv_groups!r}", hint=f"choose one of {', '.join(CONV_GROUP_MODES)}"
        )
    a = Analyser(model, attention, conv_groups)
    for name in model.input_names:
        shp = model.shape(name)
        if shp is not None and len(shp) >= 2 and shp[1] is not None:
            ids = a.new(int(shp[1]), Kind.INPUT, name)
            a.freeze(ids, f"graph input {name!r}")
            a.set(name, Chan(1, ids))
    cf = {n.name for n in control_flow_nodes(model)}
    for node in model.graph.node:
        if node.name in cf:
            _control_flow(a, node)
            continue
        dispatch(a, node)
    for name in model.output_names:
        c = a.get(name)
        if c is not None:
            a.freeze(c.ids, f"reaches graph output {name!r}")
    a.settle_dim_reads()
    return ChannelAnalysis(model, a)


def _gcd(values) -> int:
    return int(np.gcd.reduce(np.asarray(values, dtype=np.int64))) if len(values) else 1


def _control_flow(a: Analyser, node: onnx.NodeProto) -> None:
    touched = [i for i in list(node.input) + list(outer_names(node)) if a.get(i) is not None]
    if touched:
        raise UnsupportedModelError(
            f"{q(node)} is control flow on the channel path (it reads {touched[0]!r}); carve cannot analyse "
            "channels through subgraphs",
            hint="export the model without data-dependent control flow (e.g. torch.onnx.export with fixed inputs), "
            "or prune the model before adding the control flow",
        )
    for o in node.output:
        a.opaque(o, node.name, f"produced by control flow {q(node)}")
