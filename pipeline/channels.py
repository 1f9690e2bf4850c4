"""Channel dependency analysis: which channels of an ONNX graph are coupled, which can be removed, and why not.

Model (see docs/channels.md for a picture):

* An **element** is one output channel of something that creates channels: a producer (Conv, ConvTranspose, Gemm,
  MatMul with a constant weight), a depthwise conv's filter (a *member* of its input channel), a constant channel that a
  ``Pad`` or a ``Concat`` with a constant adds, or a channel of a graph input / of an op carve does not understand.
* Every tensor that carries channels holds, per index along its channel axis, the element it came from
  (:class:`Chan`). Walking the graph in topological order, one handler per op type (:data:`HANDLERS`) computes the
  output vectors from the input vectors and records
    - **unions**: elements that must be removed together (residual ``Add``, SE gating ``Mul``, depthwise in/out),
    - **freezes**: elements that must stay, with a reason (graph inputs/outputs, unknown ops, tied weights, ...),
    - **slices**: which constant is cut along which axis by which elements (weights, biases, BN statistics, ...),
    - **fixes**: attributes and shape constants that depend on channel counts (Split sizes, Pad pads, group, ...).
* Unions are solved once, at the end, as connected components. A **unit** is a set of coupled elements: it is removed
  as a whole. A **group** is a set of units that belong to the same producers (one coupled channel space, e.g. a whole
  residual stream). Inside a group, units that appear in exactly the same tensors form a **slice**: pruning ratios and
  channel alignment apply per slice, so every tensor keeps the same fraction and an aligned width.

Handlers never guess: whatever touches a channel axis in a way they cannot follow freezes the elements involved.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import onnx

from .errors import UnsupportedModelError
from .graph import Model, attr, control_flow_nodes


class Kind(IntEnum):
    OUT = 0  # output channel of a producer (Conv/ConvTranspose/Gemm/MatMul)
    MEMBER = 1  # a depthwise conv's filter: belongs to its input channel's unit
    PAD = 2  # constant channel added by Pad
    CONST = 3  # channel of a constant concatenated on the channel axis
    INPUT = 4  # channel of a graph input (always frozen)
    OPAQUE = 5  # channel of a tensor carve cannot follow (always frozen)


@dataclass(frozen=True)
class Source:
    """A run of consecutive elements created by one node or tensor."""

    name: str  # node name (OUT/MEMBER/PAD/OPAQUE) or tensor name (CONST/INPUT)
    kind: Kind
    start: int  # first element id
    count: int
    weight: str | None = None  # OUT/MEMBER: the weight initializer holding the filters
    axis: int | None = None  # OUT/MEMBER: the axis of ``weight`` indexed by output channel
    op: str | None = None

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.count)


@dataclass
class Chan:
    """Channel information of one tensor: its channel axis and the element (or unit) at each index."""

    axis: int
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SliceRecord:
    """Constant ``tensor`` is cut along ``axis``: index i survives iff the unit of ``ids[i]`` survives."""

    tensor: str
    axis: int
    ids: np.ndarray = field(compare=False)
    node: str = ""
    role: str = "param"  # "out" (producer filters), "in" (consumer columns), "param" (per-channel), "const"


class Fix:
    """An attribute or shape constant of ``node`` that must follow the channel counts after pruning."""

    node: str

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Group:
    id: int
    units: np.ndarray
    sources: list[str]
    slices: list[np.ndarray]  # units partitioned by the set of tensors they appear in

    @property
    def width(self) -> int:
        return len(self.units)


class ChannelAnalysis:
    """The result of :func:`analyse`. Element- and unit-level views, groups, slices and the surgery recipe."""

    def __init__(self, model: Model, a: _Analyser) -> None:
        self.model = model
        self.fingerprint = fingerprint(model)
        self.sources: list[Source] = a.sources
        self.n_elements = a.n
        self.slice_records: list[SliceRecord] = a.slices
        self.fixes: list[Fix] = a.fixes
        self.tensors: dict[str, Chan] = a.chan
        self.cache: dict = {}  # derived data that plugins memoise (e.g. kernel dispersion per group)
        self._solve(a)

    # -- solving -------------------------------------------------------------------------------------------------
    def _solve(self, a: _Analyser) -> None:
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

        # groups: sources linked through shared units
        self._build_groups()

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

    def _build_groups(self) -> None:
        ns = len(self.sources)
        # link each unit to the sources of its elements; groups are connected components of that bipartite graph
        labels = components(ns + self.n_units, self.element_source, ns + self.unit_of)
        self.unit_group = _renumber(labels[ns:])
        n_groups = int(self.unit_group.max()) + 1 if self.n_units else 0
        # slices: units of a group that appear in exactly the same tensors
        signature: dict[int, list[int]] = defaultdict(list)
        for t_idx, chan in enumerate(self.tensors.values()):
            for u in np.unique(self.unit_of[chan.ids]):
                signature[int(u)].append(t_idx)
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
            groups.append(Group(gid, units, srcs, slices))
        self.groups = groups

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

    def prunable_units(self) -> np.ndarray:
        return np.flatnonzero(~self.unit_frozen)

    def exclude(self, patterns: list[str]) -> ChannelAnalysis:
        """Freeze every unit that touches a node whose name matches one of the glob patterns (``--exclude``)."""
        if not patterns:
            return self
        matched = {n for n in self.model.nodes if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        for rec in self.slice_records:
            if rec.node in matched:
                self._freeze_units(self.unit_of[rec.ids], f"excluded by --exclude ({rec.node})")
        for s in self.sources:
            if s.name in matched:
                self._freeze_units(self.source_units(s), f"excluded by --exclude ({s.name})")
        return self

    def _freeze_units(self, units: np.ndarray, reason: str) -> None:
        for u in np.unique(units):
            lst = self.unit_reasons.setdefault(int(u), [])
            if reason not in lst:
                lst.append(reason)
            self.unit_frozen[u] = True

    def summary(self) -> dict:
        out = [s for s in self.sources if s.kind == Kind.OUT]
        n_out = sum(s.count for s in out)
        frozen_out = sum(int(self.unit_frozen[self.source_units(s)].sum()) for s in out)
        reasons: dict[str, int] = defaultdict(int)
        for rs in self.unit_reasons.values():
            reasons[_reason_kind(rs[0])] += 1
        return {
            "channels": n_out,
            "prunable_channels": n_out - frozen_out,
            "frozen_channels": frozen_out,
            "prunable_fraction": (n_out - frozen_out) / n_out if n_out else 0.0,
            "units": self.n_units,
            "prunable_units": int((~self.unit_frozen).sum()),
            "groups": len(self.groups),
            "frozen_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        }


def components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph on ``n`` nodes given as edge arrays; labels 0.. in order of first
    appearance. Vectorised hook-and-compress: hook every root onto the smallest root across its edges, then jump
    pointers until each node points at its root; repeat until no edge joins two roots (O(log n) rounds in practice)."""
    labels = np.arange(n, dtype=np.int64)
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    while len(src):
        ls, ld = labels[src], labels[dst]
        if np.array_equal(ls, ld):
            break
        m = np.minimum(ls, ld)
        np.minimum.at(labels, ls, m)
        np.minimum.at(labels, ld, m)
        while True:
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
    return _renumber(labels)


def _renumber(labels: np.ndarray) -> np.ndarray:
    if not len(labels):
        return labels
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def _reason_kind(reason: str) -> str:
    return reason.split("'")[0].split("(")[0].strip().rstrip(":")


def fingerprint(model: Model) -> tuple:
    g = model.graph
    return (
        tuple((n.name, n.op_type) for n in g.node),
        tuple((t.name, tuple(t.dims)) for t in g.initializer),
    )


# ======================================================================================================================
# the analyser: state threaded through the handlers


class _Analyser:
    def __init__(self, model: Model) -> None:
        self.model = model
        self.n = 0
        self.sources: list[Source] = []
        self.chan: dict[str, Chan] = {}
        self.union_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.slices: list[SliceRecord] = []
        self.fixes: list[Fix] = []

    # elements
    def new(
        self,
        count: int,
        kind: Kind,
        name: str,
        *,
        weight: str | None = None,
        axis: int | None = None,
        op: str | None = None,
    ) -> np.ndarray:
        src = Source(name, kind, self.n, count, weight, axis, op)
        self.sources.append(src)
        self.n += count
        return src.elements

    def opaque(self, tensor: str, node: str, reason: str) -> None:
        """Give ``tensor`` fresh frozen elements along axis 1 (when its channel count is known)."""
        shp = self.model.shape(tensor)
        if shp is None or len(shp) < 2 or shp[1] is None or tensor in self.chan:
            return
        ids = self.new(int(shp[1]), Kind.OPAQUE, node)
        self.freeze(ids, reason)
        self.chan[tensor] = Chan(1, ids)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):  # callers check; this is a bug guard
            raise AssertionError(f"union of vectors of different lengths {len(a)} != {len(b)}")
        self.union_pairs.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.frozen.append((np.asarray(ids, dtype=np.int64), reason))

    def cut(self, tensor: str, axis: int, ids: np.ndarray, node: onnx.NodeProto, role: str) -> None:
        self.slices.append(SliceRecord(tensor, axis, np.asarray(ids, dtype=np.int64), node.name, role))

    # tensors
    def get(self, name: str) -> Chan | None:
        return self.chan.get(name) if name else None

    def set(self, name: str, chan: Chan | None) -> None:
        if name and chan is not None:
            self.chan[name] = chan

    def rank(self, name: str) -> int | None:
        shp = self.model.shape(name)
        return None if shp is None else len(shp)

    def const(self, name: str) -> np.ndarray | None:
        return self.model.array(name) if name and self.model.is_const(name) else None

    def freeze_inputs(self, node: onnx.NodeProto, reason: str) -> None:
        for i in node.input:
            c = self.get(i)
            if c is not None:
                self.freeze(c.ids, reason)

    def expect_axis(self, node: onnx.NodeProto, chan: Chan | None, axis: int) -> Chan | None:
        """Channels must lie on ``axis`` for this op; otherwise freeze them (the op reads them as something else)."""
        if chan is None or chan.axis == axis:
            return chan
        self.freeze(chan.ids, f"{node.op_type} {node.name!r} reads them on axis {chan.axis}, expects axis {axis}")
        return None


def _q(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name!r}"


# ======================================================================================================================
# handlers: one per op type

Handler = Callable[[_Analyser, onnx.NodeProto], None]
HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return deco


def _unknown(a: _Analyser, node: onnx.NodeProto) -> None:
    reason = f"{_q(node)} is an op carve's channel analysis does not know"
    a.freeze_inputs(node, reason)
    for o in node.output:
        a.opaque(o, node.name, f"produced by {_q(node)}, which carve does not know")


# -- producers --------------------------------------------------------------------------------------------------------


def _conv_operands(a: _Analyser, node: onnx.NodeProto):
    """(weight name, bias name or None, weight, tracked input) of a Conv/ConvTranspose; None when made opaque."""
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w = a.const(w_name)
    xin = a.expect_axis(node, a.get(node.input[0]), 1)
    if w is None or (b_name and a.const(b_name) is None):
        reason = f"the {'weight' if w is None else 'bias'} of {_q(node)} is not a constant"
        a.freeze_inputs(node, reason)
        a.opaque(node.output[0], node.name, reason)
        return None
    return w_name, b_name, w, xin


def _dense_conv(a: _Analyser, node: onnx.NodeProto, w_name, b_name, xin, *, cin, cout, groups, in_axis, out_axis):
    """Output channels are new elements (weight axis ``out_axis``); input channels cut axis ``in_axis``. A grouped,
    non-depthwise conv freezes both sides: its groups would need equal pruning."""
    out = node.output[0]
    if groups > 1:
        reason = f"grouped {_q(node)} (group={groups}) would need equal pruning in every group"
        a.freeze_inputs(node, reason)
        ids = a.new(cout, Kind.OUT, node.name, weight=w_name, axis=out_axis, op=node.op_type)
        a.freeze(ids, reason)
        a.set(out, Chan(1, ids))
        return
    if xin is not None:
        if len(xin) != cin:
            a.freeze(xin.ids, f"{_q(node)} expects {cin} input channels, the analysis sees {len(xin)}")
        else:
            a.cut(w_name, in_axis, xin.ids, node, "in")
    ids = a.new(cout, Kind.OUT, node.name, weight=w_name, axis=out_axis, op=node.op_type)
    a.cut(w_name, out_axis, ids, node, "out")
    if b_name:
        a.cut(b_name, 0, ids, node, "out")
    a.set(out, Chan(1, ids))


def _depthwise(a: _Analyser, node: onnx.NodeProto, w_name, b_name, ids: np.ndarray, per_input: int, rows) -> None:
    """Output channel o comes from input channel ids[o]; ``rows`` (the input channel of each weight row) makes the
    weight's rows members of their input channel's unit."""
    members = a.new(len(rows), Kind.MEMBER, node.name, weight=w_name, axis=0, op=node.op_type)
    a.union(members, rows)
    a.cut(w_name, 0, rows, node, "member")
    if b_name:
        a.cut(b_name, 0, ids, node, "member")
    a.fixes.append(GroupFix(node.name, ids[::per_input]))
    a.set(node.output[0], Chan(1, ids))


@handles("Conv")
def _conv(a: _Analyser, node: onnx.NodeProto) -> None:
    operands = _conv_operands(a, node)
    if operands is None:
        return
    w_name, b_name, w, xin = operands
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    g = int(attr(node, "group", 1))
    if g > 1 and cin_g == 1 and cout % g == 0:
        # depthwise (channel multiplier m = cout/g): output o is computed from input channel o // m only
        m = cout // g
        if xin is not None and len(xin) == g:
            ids = xin.ids
        else:
            ids = a.new(g, Kind.OPAQUE, node.name)
            a.freeze(ids, f"the input channels of depthwise {_q(node)} are not tracked")
        ids = np.repeat(ids, m)
        _depthwise(a, node, w_name, b_name, ids, m, rows=ids)
        return
    _dense_conv(a, node, w_name, b_name, xin, cin=cin_g * g, cout=cout, groups=g, in_axis=1, out_axis=0)


@handles("ConvTranspose")
def _conv_transpose(a: _Analyser, node: onnx.NodeProto) -> None:
    operands = _conv_operands(a, node)
    if operands is None:
        return
    w_name, b_name, w, xin = operands
    cin, cout_g = int(w.shape[0]), int(w.shape[1])
    g = int(attr(node, "group", 1))
    if g > 1 and g == cin and xin is not None and len(xin) == cin:
        # depthwise transposed conv: output channels c*m .. c*m+m-1 come from input channel c (weight is Cin x m)
        _depthwise(a, node, w_name, b_name, np.repeat(xin.ids, cout_g), cout_g, rows=xin.ids)
        return
    _dense_conv(a, node, w_name, b_name, xin, cin=cin, cout=cout_g * g, groups=g, in_axis=0, out_axis=1)


@handles("Gemm")
def _gemm(a: _Analyser, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input[0], node.input[1]
    c_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out = node.output[0]
    w = a.const(b_name)
    if w is None or (c_name and a.const(c_name) is None and a.get(c_name) is None):
        a.freeze_inputs(node, f"the weight of {_q(node)} is not a constant")
        a.opaque(out, node.name, f"{_q(node)} multiplies two activations")
        return
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    xin = a.get(a_name)
    if xin is not None:
        if trans_a or xin.axis != 1:
            a.freeze(xin.ids, f"{_q(node)} reads its input transposed")
        elif len(xin) != w.shape[k_axis]:
            a.freeze(xin.ids, f"{_q(node)} expects {w.shape[k_axis]} inputs, the analysis sees {len(xin)}")
        else:
            a.cut(b_name, k_axis, xin.ids, node, "in")
    ids = a.new(int(w.shape[n_axis]), Kind.OUT, node.name, weight=b_name, axis=n_axis, op=node.op_type)
    a.cut(b_name, n_axis, ids, node, "out")
    if c_name:
        c = a.const(c_name)
        if c is not None:
            if c.ndim >= 1 and c.shape[-1] == len(ids) and len(ids) > 1:
                a.cut(c_name, c.ndim - 1, ids, node, "out")
        else:  # a channel tensor added as C: like a residual Add
            cc = a.get(c_name)
            if cc is not None and len(cc) == len(ids) and cc.axis == (a.rank(c_name) or 2) - 1:
                a.union(cc.ids, ids)
            elif cc is not None:
                a.freeze(cc.ids, f"{_q(node)} broadcasts its C input")
                a.freeze(ids, f"{_q(node)} broadcasts its C input")
    a.set(out, Chan(1, ids))


@handles("MatMul")
def _matmul(a: _Analyser, node: onnx.NodeProto) -> None:
    a_name, b_name = node.input
    out = node.output[0]
    w = a.const(b_name)
    xin = a.get(a_name)
    ra = a.rank(a_name)
    if w is None or w.ndim != 2 or ra is None:
        a.freeze_inputs(node, f"{_q(node)} has no constant 2-D weight")
        a.opaque(out, node.name, f"{_q(node)} multiplies two activations")
        return
    if xin is not None and xin.axis < ra - 2:
        # channels on a batch axis of the product: they pass through untouched
        a.set(out, Chan(xin.axis, xin.ids))
        return
    if xin is not None:
        if xin.axis != ra - 1:
            a.freeze(xin.ids, f"{_q(node)} contracts over axis {ra - 1}, the channels are on axis {xin.axis}")
        elif len(xin) != w.shape[0]:
            a.freeze(xin.ids, f"{_q(node)} expects {w.shape[0]} inputs, the analysis sees {len(xin)}")
        else:
            a.cut(b_name, 0, xin.ids, node, "in")
    ids = a.new(int(w.shape[1]), Kind.OUT, node.name, weight=b_name, axis=1, op=node.op_type)
    a.cut(b_name, 1, ids, node, "out")
    a.set(out, Chan(ra - 1, ids))


# -- per-channel ops -------------------------------------------------------------------------------------------------


_UNARY = (
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign Mish Gelu Erf Exp Log Sqrt "
    "Abs Neg Reciprocal Floor Ceil Round Sign Sin Cos ThresholdedRelu Shrink Identity Dropout Cast CastLike Not "
    "IsNaN IsInf Relu6 Swish"
).split()


@handles(*_UNARY)
def _unary(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    for o in node.output:  # Dropout's mask carries the same channels
        a.set(o, c)


@handles("Clip")
def _clip(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    for i in node.input[1:]:
        if i and a.const(i) is None:
            # data-dependent limits: fine as long as they are scalars (shape ())
            shp = a.model.shape(i)
            if shp is None or len(shp) != 0:
                a.freeze_inputs(node, f"{_q(node)} has non-scalar limits")
    a.set(node.output[0], c)


@handles("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def _pool(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.expect_axis(node, a.get(node.input[0]), 1)
    a.set(node.output[0], c)
    if len(node.output) > 1 and node.output[1] and c is not None:
        # MaxPool indices are flat offsets that include the channel index
        a.freeze(c.ids, f"the indices output of {_q(node)} encodes channel positions")


@handles("BatchNormalization", "InstanceNormalization")
def _norm(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.expect_axis(node, a.get(node.input[0]), 1)
    params = [p for p in node.input[1:] if p]
    if c is not None:
        if not all(a.const(p) is not None for p in params):
            a.freeze(c.ids, f"the parameters of {_q(node)} are not constants")
        else:
            for p in params:
                if a.const(p).shape[0] == len(c):
                    a.cut(p, 0, c.ids, node, "param")
                else:
                    a.freeze(c.ids, f"parameter {p!r} of {_q(node)} does not match the channel count")
    a.set(node.output[0], c)


@handles("LayerNormalization", "GroupNormalization", "LRN", "MeanVarianceNormalization")
def _mixing_norm(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is not None:
        r = a.rank(node.input[0])
        mixes = True
        if node.op_type == "LayerNormalization" and r is not None:
            first = int(attr(node, "axis", -1)) % r
            mixes = c.axis >= first
        elif node.op_type == "MeanVarianceNormalization" and r is not None:
            mixes = c.axis % r in [int(x) % r for x in attr(node, "axes", [0, 2, 3])]
        if mixes:
            a.freeze(c.ids, f"{_q(node)} normalises across channels")
        elif node.op_type == "LayerNormalization":
            pass  # normalised axes do not include the channels; scale/bias are over the other axes
    a.set(node.output[0], c)


@handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    r = a.rank(node.input[0])
    if c is not None and r is not None:
        default = -1 if a.model.opset >= 13 else 1
        ax = int(attr(node, "axis", default)) % r
        if ax == c.axis or (a.model.opset < 13 and ax <= c.axis):
            a.freeze(c.ids, f"{_q(node)} normalises across channels")
    a.set(node.output[0], c)


# -- elementwise between tensors ---------------------------------------------------------------------------------


@handles(
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Max",
    "Min",
    "Sum",
    "Mean",
    "Pow",
    "PRelu",
    "Mod",
    "Equal",
    "Greater",
    "Less",
    "GreaterOrEqual",
    "LessOrEqual",
    "And",
    "Or",
    "Xor",
    "Where",
    "BitShift",
)
def _elementwise(a: _Analyser, node: onnx.NodeProto) -> None:
    out = node.output[0]
    r_out = a.rank(out)
    ins = [i for i in node.input if i]
    if r_out is None:
        r_out = max((a.rank(i) or 0) for i in ins)
    chans = [(i, a.get(i)) for i in ins]
    # position of each operand's channel axis in output coordinates
    aligned = {i: r_out - (a.rank(i) or r_out) + c.axis for i, c in chans if c is not None}
    if not aligned:
        return
    out_shape = a.model.shape(out)
    axes = set(aligned.values())
    if len(axes) > 1:
        for _, c in chans:
            if c is not None:
                a.freeze(c.ids, f"{_q(node)} combines tensors whose channels lie on different axes")
        first = next(c for _, c in chans if c is not None)
        a.set(out, Chan(r_out - (a.rank(ins[0]) or r_out) + first.axis, first.ids))
        return
    axis = axes.pop()
    width = max(len(c) for _, c in chans if c is not None)
    if out_shape is not None and out_shape[axis] is not None:
        width = int(out_shape[axis])
    full = [c for _, c in chans if c is not None and len(c) == width]
    for i, c in chans:
        if c is not None and len(c) != width:
            a.freeze(c.ids, f"{_q(node)} broadcasts {i!r} over the channel axis")
    if not full:
        return
    ref = full[0].ids
    for c in full[1:]:
        a.union(ref, c.ids)
    for i, c in chans:
        if c is not None:
            continue
        val = a.const(i)
        shp = a.model.shape(i)
        r = len(shp) if shp is not None else None
        cax = None if r is None else axis - (r_out - r)
        dim = None if (shp is None or cax is None or cax < 0) else shp[cax]
        if cax is not None and (cax < 0 or dim == 1):
            continue  # broadcast along the channels: no coupling
        if val is not None and dim == width:
            a.cut(i, cax, ref, node, "param")
        else:
            a.freeze(ref, f"{_q(node)} combines them with {i!r}, whose channels carve does not track")
    a.set(out, Chan(axis, ref))


# -- structure: concat, split, slice, pad, gather ----------------------------------------------------------------------


@handles("Concat")
def _concat(a: _Analyser, node: onnx.NodeProto) -> None:
    out = node.output[0]
    r = a.rank(out) or max((a.rank(i) or 0) for i in node.input if i)
    axis = int(attr(node, "axis", 0)) % r
    chans = [(i, a.get(i)) for i in node.input if i]
    tracked = [c for _, c in chans if c is not None]
    if not tracked:
        return
    if all(c is None or c.axis == axis for _, c in chans):
        parts = []
        for i, c in chans:
            if c is not None:
                parts.append(c.ids)
                continue
            shp = a.model.shape(i)
            n = None if shp is None else shp[axis]
            if n is None:
                a.freeze(np.concatenate([c.ids for c in tracked]), f"{_q(node)} concatenates {i!r} of unknown size")
                return
            if a.const(i) is not None:
                ids = a.new(int(n), Kind.CONST, i, op="Concat")
                a.cut(i, axis, ids, node, "const")
            else:
                ids = a.new(int(n), Kind.OPAQUE, i)
                a.freeze(ids, f"concatenated by {_q(node)} from {i!r}, whose channels carve does not track")
            parts.append(ids)
        a.set(out, Chan(axis, np.concatenate(parts)))
        return
    # concatenation along another axis: all operands carry the same channels
    _elementwise_like_concat(a, node, chans, axis)


def _elementwise_like_concat(a: _Analyser, node: onnx.NodeProto, chans: list, cat_axis: int) -> None:
    tracked = [c for _, c in chans if c is not None]
    axis = tracked[0].axis
    if any(c.axis != axis or len(c) != len(tracked[0]) for c in tracked):
        for c in tracked:
            a.freeze(c.ids, f"{_q(node)} joins tensors whose channels do not line up")
        a.set(node.output[0], tracked[0])
        return
    ref = tracked[0].ids
    for c in tracked[1:]:
        a.union(ref, c.ids)
    for i, c in chans:
        if c is None:
            if a.const(i) is not None and a.const(i).shape[axis] == len(ref):
                a.cut(i, axis, ref, node, "param")
            else:
                a.freeze(ref, f"{_q(node)} joins them with {i!r}, whose channels carve does not track")
    a.set(node.output[0], Chan(axis, ref))


@handles("Split")
def _split(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    axis = int(attr(node, "axis", 0)) % r
    if axis != c.axis:
        for o in node.output:
            a.set(o, c)
        return
    sizes = _split_sizes(a, node, len(c))
    if sizes is None:
        a.freeze(c.ids, f"{_q(node)} splits the channel axis by sizes computed at run time")
        for o in node.output:
            a.opaque(o, node.name, f"split by {_q(node)}")
        return
    bounds = np.cumsum([0, *sizes])
    segments = [c.ids[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]
    for o, seg in zip(node.output, segments):
        a.set(o, Chan(axis, seg))
    a.fixes.append(SplitFix(node.name, segments))


def _split_sizes(a: _Analyser, node: onnx.NodeProto, total: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        v = a.const(node.input[1])
        return None if v is None else [int(x) for x in v]
    s = attr(node, "split")
    if s is not None:
        return [int(x) for x in s]
    k = int(attr(node, "num_outputs", len(node.output)))
    step = -(-total // k)  # ceil: the last chunk may be smaller (opset 18 semantics)
    sizes = [min(step, total - i * step) for i in range(k)]
    return sizes if all(s > 0 for s in sizes) else None


@handles("Slice")
def _slice(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    vals = [a.const(i) if len(node.input) > k and i else None for k, i in enumerate(node.input)]
    if any(len(node.input) > k and node.input[k] and vals[k] is None for k in range(1, len(node.input))):
        a.freeze(c.ids, f"{_q(node)} slices with bounds computed at run time")
        a.opaque(node.output[0], node.name, f"sliced by {_q(node)}")
        return
    starts, ends = list(vals[1]), list(vals[2])
    axes = list(vals[3]) if len(vals) > 3 and vals[3] is not None else list(range(len(starts)))
    steps = list(vals[4]) if len(vals) > 4 and vals[4] is not None else [1] * len(starts)
    axes = [int(x) % r for x in axes]
    if c.axis not in axes:
        a.set(node.output[0], c)
        return
    k = axes.index(c.axis)
    n = len(c)
    start, end, step = int(starts[k]), int(ends[k]), int(steps[k])
    idx = np.arange(n)[slice(start, end, step)]
    if step != 1 or len(idx) == 0:
        a.freeze(c.ids, f"{_q(node)} takes every {step}th channel" if step != 1 else f"{_q(node)} selects no channel")
        a.set(node.output[0], Chan(c.axis, c.ids[idx]))
        return
    a.set(node.output[0], Chan(c.axis, c.ids[idx]))
    a.fixes.append(SliceFix(node.name, k, c.ids, int(idx[0]), int(idx[0]) + len(idx)))


@handles("Pad")
def _pad(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    pads = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "pads")
    axes_in = a.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if pads is None or (len(node.input) > 3 and node.input[3] and axes_in is None):
        a.freeze(c.ids, f"{_q(node)} pads by amounts computed at run time")
        a.opaque(node.output[0], node.name, f"padded by {_q(node)}")
        return
    pads = [int(p) for p in pads]
    axes = [int(x) % r for x in axes_in] if axes_in is not None else list(range(r))
    if c.axis not in axes:
        a.set(node.output[0], c)
        return
    k = axes.index(c.axis)
    before, after = pads[k], pads[k + len(axes)]
    if before == 0 and after == 0:
        a.set(node.output[0], c)
        return
    mode = attr(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant" or before < 0 or after < 0:
        a.freeze(c.ids, f"{_q(node)} pads the channel axis in mode {mode!r}")
        a.opaque(node.output[0], node.name, f"padded by {_q(node)}")
        return
    b_ids = a.new(before, Kind.PAD, node.name)
    e_ids = a.new(after, Kind.PAD, node.name)
    a.set(node.output[0], Chan(c.axis, np.concatenate([b_ids, c.ids, e_ids])))
    a.fixes.append(PadFix(node.name, k, len(axes), b_ids, e_ids))


@handles("Gather")
def _gather(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    axis = int(attr(node, "axis", 0)) % r
    idx = a.const(node.input[1])
    if axis != c.axis:
        if idx is None or idx.ndim > 1:
            a.freeze(c.ids, f"{_q(node)} gathers with indices that change the rank")
            return
        a.set(node.output[0], Chan(c.axis - (1 if axis < c.axis and idx.ndim == 0 else 0), c.ids))
        return
    if idx is None or idx.ndim != 1:
        a.freeze(c.ids, f"{_q(node)} picks channels by indices carve cannot follow")
        a.opaque(node.output[0], node.name, f"gathered by {_q(node)}")
        return
    idx = np.where(idx < 0, idx + len(c), idx).astype(np.int64)
    a.set(node.output[0], Chan(axis, c.ids[idx]))
    a.fixes.append(GatherFix(node.name, c.ids, idx))


# -- shape-changing ops ----------------------------------------------------------------------------------------------


@handles("Flatten")
def _flatten(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    shp = a.model.shape(node.input[0])
    r = len(shp) if shp else None
    axis = int(attr(node, "axis", 1)) % (r or 1)
    if r is None:
        a.freeze(c.ids, f"{_q(node)} flattens a tensor of unknown rank")
        return
    if c.axis < axis:
        a.set(node.output[0], c)  # channels stay on the outer (first) axis
        return
    dims = shp[axis:]
    if axis == 0 or any(d is None for d in dims):
        a.freeze(c.ids, f"{_q(node)} flattens the channels with dynamic dimensions")
        a.opaque(node.output[0], node.name, f"flattened by {_q(node)}")
        return
    inner = int(np.prod(shp[c.axis + 1 :], dtype=np.int64))
    outer = int(np.prod(shp[axis : c.axis], dtype=np.int64))
    a.set(node.output[0], Chan(1, np.tile(np.repeat(c.ids, inner), outer)))


@handles("Reshape")
def _reshape(a: _Analyser, node: onnx.NodeProto) -> None:
    """Followed when the channel axis keeps its place and merges only with the dims right after it (Flatten-like,
    e.g. ``x.view(x.size(0), -1)``); a Reshape that splits the channel axis (channel shuffle) freezes it."""
    c = a.get(node.input[0])
    if c is None:
        return
    ins = a.model.shape(node.input[0])
    entries = shape_entries(a.model, node.input[1])
    ax = c.axis
    tail = _reshape_tail(ins, entries, ax, node.input[0])
    if tail is None:
        a.freeze(c.ids, f"{_q(node)} reshapes to a shape carve cannot see")
        a.opaque(node.output[0], node.name, f"reshaped by {_q(node)}")
        return
    tail_in = ins[ax:]
    # output axis `ax` is the channel axis merged with the j-1 dims right after it; what follows may be reshaped freely
    acc, j = 1, None
    for k, d in enumerate(tail_in):
        acc *= int(d)
        if acc == tail[0]:
            j = k + 1
            break
        if acc > tail[0]:
            break
    explicit = entries[ax] is not None and not isinstance(entries[ax], tuple) and entries[ax] > 0
    fixable = not explicit or a.const(node.input[1]) is not None
    if j is not None and fixable and np.prod(tail_in[j:], dtype=np.int64) == np.prod(tail[1:], dtype=np.int64):
        inner = int(np.prod(tail_in[1:j], dtype=np.int64))
        a.set(node.output[0], Chan(ax, np.repeat(c.ids, inner)))
        if explicit:
            a.fixes.append(ReshapeFix(node.name, ax, c.ids, inner))
        return
    a.freeze(c.ids, f"{_q(node)} reshapes the channel axis")
    a.opaque(node.output[0], node.name, f"reshaped by {_q(node)}")


def _reshape_tail(ins, entries, ax: int, data: str) -> list[int] | None:
    """The output dims from the channel axis on, when the dims before it are copied from the input unchanged."""
    if ins is None or entries is None or len(entries) <= ax or any(d is None for d in ins[ax:]):
        return None
    rest = entries[ax:]
    for k, e in enumerate(entries[:ax]):
        same = e == 0 or e == ("dim", data, k) or (isinstance(e, int) and ins[k] is not None and e == ins[k])
        # a -1 before the channel axis (e.g. [-1, C*H*W]) is the batch when the tail holds every other element
        inferred = e == -1 and k == 0 and ax == 1 and all(isinstance(x, int) and x > 0 for x in rest)
        if not (same or inferred):
            return None
    if any(not isinstance(e, int) for e in rest) or sum(e == -1 for e in rest) > 1:
        return None
    total = int(np.prod(ins[ax:], dtype=np.int64))
    dims = [int(ins[ax + k]) if e == 0 else e for k, e in enumerate(rest)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
        if known == 0 or total % known:
            return None
        dims[dims.index(-1)] = total // known
    return dims if int(np.prod(dims, dtype=np.int64)) == total else None


def shape_entries(model: Model, name: str, depth: int = 6) -> list | None:
    """The entries of a 1-D shape tensor: ints where constant, ``("dim", tensor, k)`` where it reads dimension k of a
    tensor at run time (``x.size(0)``), None where unknown; None overall when the tensor cannot be followed."""
    if model.is_const(name):
        v = model.array(name)
        return [int(x) for x in np.ravel(v)] if v.ndim <= 1 else None
    node = model.producer.get(name)
    if node is None or depth == 0:
        return None
    if node.op_type == "Concat":
        parts = [shape_entries(model, i, depth - 1) for i in node.input]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op_type in ("Unsqueeze", "Cast", "Identity", "Squeeze"):
        inner = shape_entries(model, node.input[0], depth - 1)
        return inner if inner is not None and len(inner) <= 1 else None
    src = model.producer.get(node.input[0]) if node.op_type == "Gather" else None
    if src is not None and src.op_type == "Shape" and model.is_const(node.input[1]):
        start = int(attr(src, "start", 0))
        return [("dim", src.input[0], start + int(k)) for k in np.ravel(model.array(node.input[1]))]
    return None


@handles("Transpose")
def _transpose(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    perm = attr(node, "perm")
    perm = list(range(r))[::-1] if perm is None else [int(p) for p in perm]
    a.set(node.output[0], Chan(perm.index(c.axis), c.ids))


@handles("Squeeze", "Unsqueeze")
def _squeeze(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r_in = a.rank(node.input[0])
    axes = a.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "axes")
    if axes is None and node.op_type == "Squeeze":
        shp = a.model.shape(node.input[0])
        if shp is None or any(d is None for d in shp):
            a.freeze(c.ids, f"{_q(node)} squeezes unknown axes")
            return
        axes = [k for k, d in enumerate(shp) if d == 1]
    axes = [int(x) for x in axes]
    if node.op_type == "Squeeze":
        axes = [x % r_in for x in axes]
        if c.axis in axes:
            a.freeze(c.ids, f"{_q(node)} removes the channel axis")
            return
        a.set(node.output[0], Chan(c.axis - sum(1 for x in axes if x < c.axis), c.ids))
    else:
        r_out = r_in + len(axes)
        axes = sorted(x % r_out for x in axes)
        pos = c.axis
        for x in axes:
            if x <= pos:
                pos += 1
        a.set(node.output[0], Chan(pos, c.ids))


_REDUCE = (
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
    "ReduceSumSquare ArgMax ArgMin"
).split()


@handles(*_REDUCE)
def _reduce(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(attr(node, "axis", 0))]
    elif len(node.input) > 1 and node.input[1]:
        v = a.const(node.input[1])
        if v is None:
            a.freeze(c.ids, f"{_q(node)} reduces over axes computed at run time")
            return
        axes = [int(x) for x in v]
    else:
        axes = attr(node, "axes")
        axes = list(range(r)) if axes is None else [int(x) for x in axes]
    if not axes and not attr(node, "noop_with_empty_axes", 0):
        axes = list(range(r))
    axes = [x % r for x in axes]
    if c.axis in axes:
        a.freeze(c.ids, f"{_q(node)} reduces over the channels")
        return
    keep = int(attr(node, "keepdims", 1))
    pos = c.axis if keep else c.axis - sum(1 for x in axes if x < c.axis)
    a.set(node.output[0], Chan(pos, c.ids))


@handles("Resize", "Upsample")
def _resize(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    scales_name = node.input[2] if len(node.input) > 2 else (node.input[1] if node.op_type == "Upsample" else "")
    scales = a.const(scales_name) if scales_name else None
    if scales is not None and scales.size > c.axis and scales.size > 1 and float(scales[c.axis]) != 1.0:
        a.freeze(c.ids, f"{_q(node)} resizes the channel axis")
        return
    sizes_name = node.input[3] if len(node.input) > 3 else ""
    if sizes_name:
        if a.const(sizes_name) is None:
            a.freeze(c.ids, f"{_q(node)} resizes to sizes computed at run time")
            a.opaque(node.output[0], node.name, f"resized by {_q(node)}")
            return
        r = a.rank(node.input[0]) or 4
        axes = attr(node, "axes")  # opset 18: sizes may list only some axes
        axes = list(range(r)) if axes is None else [int(x) % r for x in axes]
        if c.axis in axes:
            a.fixes.append(ShapeEntryFix(node.name, 3, axes.index(c.axis), c.ids, 1))
    a.set(node.output[0], c)


@handles("Expand")
def _expand(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r_in, out = a.rank(node.input[0]), a.model.shape(node.output[0])
    if r_in is None or out is None:
        a.freeze(c.ids, f"{_q(node)} expands to an unknown shape")
        return
    pos = len(out) - r_in + c.axis
    if out[pos] != len(c):
        a.freeze(c.ids, f"{_q(node)} broadcasts the channel axis")
        return
    target = a.const(node.input[1])
    if target is not None and len(target) > pos - (len(out) - len(target)) >= 0:
        k = pos - (len(out) - len(target))
        if int(target[k]) == len(c) and len(c) > 1:
            a.fixes.append(ShapeEntryFix(node.name, 1, k, c.ids, 1))
    a.set(node.output[0], Chan(pos, c.ids))


@handles("Tile")
def _tile(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    reps = a.const(node.input[1])
    if reps is None or int(reps[c.axis]) != 1:
        a.freeze(c.ids, f"{_q(node)} repeats the channel axis")
        a.opaque(node.output[0], node.name, f"tiled by {_q(node)}")
        return
    a.set(node.output[0], c)


@handles("Shape", "Size")
def _shape(a: _Analyser, node: onnx.NodeProto) -> None:
    """Reading a tensor's shape is harmless unless the channel count is used; then freeze."""
    c = a.get(node.input[0])
    if c is None:
        return
    if node.op_type == "Size":
        a.freeze(c.ids, f"its element count is read by {_q(node)}")
        return
    r = a.rank(node.input[0])
    start = int(attr(node, "start", 0)) % (r + 1) if r else 0
    end = attr(node, "end")
    end = r if end is None else int(end) % (r + 1) if int(end) < 0 else min(int(end), r)
    if not (start <= c.axis < end):
        return
    pos = c.axis - start
    for user in a.model.consumers.get(node.output[0], []):
        if user.op_type == "Gather":
            idx = a.const(user.input[1])
            if idx is not None and pos not in [int(v) % (end - start) for v in np.ravel(idx)]:
                continue
        elif user.op_type == "Slice":
            st, en = a.const(user.input[1]), a.const(user.input[2])
            if st is not None and en is not None and pos not in range(end - start)[slice(int(st[0]), int(en[0]))]:
                continue
        a.freeze(c.ids, f"the channel count is read at run time by {_q(user)} (via {_q(node)})")
        return


@handles("QuantizeLinear", "DequantizeLinear")
def _qdq(a: _Analyser, node: onnx.NodeProto) -> None:
    c = a.get(node.input[0])
    if c is None:
        return
    r = a.rank(node.input[0])
    axis = int(attr(node, "axis", 1)) % r
    for p in node.input[1:]:
        v = a.const(p) if p else None
        if not p or (v is not None and v.size == 1):
            continue
        if v is not None and v.ndim == 1 and axis == c.axis and len(v) == len(c):
            a.cut(p, 0, c.ids, node, "param")
        else:
            a.freeze(c.ids, f"{_q(node)} quantises with parameters carve cannot follow")
    a.set(node.output[0], c)


for _op in ("Constant", "ConstantOfShape", "Range", "EyeLike", "RandomNormal", "RandomUniform"):
    HANDLERS[_op] = lambda a, n: None


# ======================================================================================================================
# fixes applied by surgery


def _set_input_const(model: Model, node: onnx.NodeProto, idx: int, arr: np.ndarray) -> None:
    """Give ``node`` input ``idx`` a new constant value without touching other readers of the old one."""
    name = node.input[idx]
    if name in model.init and len(model.consumers.get(name, [])) == 1:
        model.set_array(name, arr)
    else:
        node.input[idx] = model.add_initializer(f"{node.name}_{idx}", arr)


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, at in enumerate(node.attribute):
        if at.name == name:
            del node.attribute[k]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


@dataclass
class GroupFix(Fix):
    node: str
    ids: np.ndarray  # one element per group (input channel)

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        _set_attr(model.nodes[self.node], "group", int(keep(self.ids).sum()))


@dataclass
class SplitFix(Fix):
    node: str
    segments: list[np.ndarray]

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        sizes = [int(keep(s).sum()) for s in self.segments]
        node = model.nodes[self.node]
        if len(node.input) > 1 and node.input[1]:
            _set_input_const(model, node, 1, np.array(sizes, dtype=np.int64))
        elif model.opset >= 13:
            # opset 13+ takes sizes as an input; opset 18's num_outputs (equal chunks) may no longer hold
            for k, at in enumerate(node.attribute):
                if at.name == "num_outputs":
                    del node.attribute[k]
                    break
            while len(node.input) < 2:
                node.input.append("")
            node.input[1] = model.add_initializer(f"{node.name}_split", np.array(sizes, dtype=np.int64))
        else:
            _set_attr(node, "split", sizes)


@dataclass
class SliceFix(Fix):
    node: str
    k: int  # position of the channel axis in starts/ends/axes
    ids: np.ndarray  # the input's channel vector
    start: int
    end: int

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        kept = keep(self.ids)
        new_start = int(kept[: self.start].sum())
        new_end = new_start + int(kept[self.start : self.end].sum())
        node = model.nodes[self.node]
        for idx, value in ((1, new_start), (2, new_end)):
            arr = model.array(node.input[idx]).copy()
            arr[self.k] = value
            _set_input_const(model, node, idx, arr)


@dataclass
class PadFix(Fix):
    node: str
    k: int
    n_axes: int
    before: np.ndarray
    after: np.ndarray

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        node = model.nodes[self.node]
        b, e = int(keep(self.before).sum()), int(keep(self.after).sum())
        if len(node.input) > 1 and node.input[1]:
            pads = model.array(node.input[1]).copy()
            pads[self.k], pads[self.k + self.n_axes] = b, e
            _set_input_const(model, node, 1, pads)
        else:
            pads = list(attr(node, "pads"))
            pads[self.k], pads[self.k + self.n_axes] = b, e
            _set_attr(node, "pads", pads)


@dataclass
class GatherFix(Fix):
    node: str
    ids: np.ndarray
    idx: np.ndarray

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        kept = keep(self.ids)
        new_pos = np.cumsum(kept) - 1
        sel = self.idx[kept[self.idx]]
        node = model.nodes[self.node]
        _set_input_const(model, node, 1, new_pos[sel].astype(model.array(node.input[1]).dtype))


@dataclass
class ReshapeFix(Fix):
    node: str
    pos: int  # entry of the shape constant that holds the channel dimension
    ids: np.ndarray
    inner: int  # dims merged into the channel entry

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        node = model.nodes[self.node]
        shape = model.array(node.input[1]).copy()
        if self.pos < len(shape) and int(shape[self.pos]) > 0:
            shape[self.pos] = int(keep(self.ids).sum()) * self.inner
            _set_input_const(model, node, 1, shape)


@dataclass
class ShapeEntryFix(Fix):
    """An explicit channel count in a shape-like input (Resize sizes, Expand shape)."""

    node: str
    input_idx: int
    pos: int
    ids: np.ndarray
    inner: int

    def apply(self, model: Model, keep: Callable[[np.ndarray], np.ndarray]) -> None:
        node = model.nodes[self.node]
        arr = model.array(node.input[self.input_idx]).copy()
        arr[self.pos] = int(keep(self.ids).sum()) * self.inner
        _set_input_const(model, node, self.input_idx, arr)


# ======================================================================================================================
# entry point


def analyse(model: Model) -> ChannelAnalysis:
    """Analyse the channels of a prepared model (:func:`pipeline.graph.load`)."""
    a = _Analyser(model)
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
        if node.domain not in ("", "ai.onnx"):
            _unknown(a, node)
            continue
        HANDLERS.get(node.op_type, _unknown)(a, node)
    for name in model.output_names:
        c = a.get(name)
        if c is not None:
            a.freeze(c.ids, f"reaches graph output {name!r}")
    return ChannelAnalysis(model, a)


def _control_flow(a: _Analyser, node: onnx.NodeProto) -> None:
    from .graph import _outer_names

    touched = [i for i in list(node.input) + list(_outer_names(node)) if a.get(i) is not None]
    if touched:
        raise UnsupportedModelError(
            f"{_q(node)} is control flow on the channel path (it reads {touched[0]!r}); carve cannot analyse "
            "channels through subgraphs",
            hint="export the model without data-dependent control flow (e.g. torch.onnx.export with fixed inputs), "
            "or prune the model before adding the control flow",
        )
    for o in node.output:
        a.opaque(o, node.name, f"produced by control flow {_q(node)}")


__all__ = ["analyse", "ChannelAnalysis", "Chan", "Kind", "Source", "Group", "SliceRecord", "HANDLERS", "fingerprint"]
