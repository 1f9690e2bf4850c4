"""The state threaded through the channel handlers while the graph is walked: new elements, the channel vector of
every tensor, and the unions, freezes, slices, fixes, statistics (inexact removals), lockstep sets and unit spans the
handlers record (:mod:`carve.pipeline.graph.channels`)."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Block, Chan, Kind, Layout, SliceRecord, Source, StatRecord
from carve.pipeline.graph.channels.fixes import Fix
from carve.pipeline.graph.model import Model

ATTENTION_MODES = ("heads", "width")
CONV_GROUP_MODES = ("whole", "width")


class Analyser:
    def __init__(self, model: Model, attention: str = "heads", conv_groups: str = "whole") -> None:
        self.model = model
        self.attention = attention  # "heads": whole heads are units; "width": per-head widths of Q/K and V/out
        self.conv_groups = conv_groups  # grouped convs: "whole": whole groups; "width": equal widths in every group
        self.n = 0
        self.sources: list[Source] = []
        self.chan: dict[str, Chan] = {}
        self.union_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.slices: list[SliceRecord] = []
        self.fixes: list[Fix] = []
        self.stats: list[StatRecord] = []
        self.contracts: list = []  # ContractRecord: channels contracted between two activations (q @ k^T)
        self.inexact: list[tuple[np.ndarray, str]] = []  # elements whose removal changes a statistic, and why
        self.lockstep: list[list[np.ndarray]] = []  # member element sets that must lose equal numbers of units
        self.spans: list[tuple[np.ndarray, int]] = []  # elements whose unit spans this many channels (heads)
        # channel counts read at run time into Reshape targets: (tensor, axis, ids, reason, the Reshapes reading it);
        # each Reshape that checks the dim lands where the same channels do adds (reshape, tensor, axis) to the set
        self.dim_reads: list[tuple[str, int, np.ndarray, str, frozenset[str]]] = []
        self.dim_reads_ok: set[tuple[str, str, int]] = set()

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
        a, b = np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1)
        if len(a) != len(b):  # callers check; this is a bug guard
            raise AssertionError(f"union of vectors of different lengths {len(a)} != {len(b)}")
        self.union_pairs.append((a, b))

    def union_all(self, ids: np.ndarray) -> None:
        """All of ``ids`` in one unit."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) > 1:
            self.union(ids[:-1], ids[1:])

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids):
            self.frozen.append((ids, reason))

    def cut(self, tensor: str, axis: int, ids: np.ndarray, node: onnx.NodeProto, role: str) -> None:
        self.slices.append(SliceRecord(tensor, axis, np.asarray(ids, dtype=np.int64).reshape(-1), node.name, role))

    def stat(self, node: onnx.NodeProto, kind: str, chan: Chan, reason: str) -> None:
        """``node`` computes a statistic over ``chan``'s channels (LayerNorm): removing any of them is inexact."""
        self.stats.append(StatRecord(node.name, kind, node.input[0], chan.axis, np.asarray(chan.ids, dtype=np.int64)))
        self.inexact.append((np.asarray(chan.ids, dtype=np.int64), reason))

    def lockstep_lines(self, ids: np.ndarray) -> None:
        """Every line of ``ids`` along its last axis must lose as many units as the others (equal head widths)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim >= 2 and ids.shape[-1] > 1:
            lines = ids.reshape(-1, ids.shape[-1])
            if len(lines) > 1:
                self.lockstep.append(list(lines))

    def span(self, ids: np.ndarray, channels: int) -> None:
        """The unit of each of ``ids`` spans ``channels`` channels of the tensors it is aligned in (a head)."""
        self.spans.append((np.asarray(ids, dtype=np.int64).reshape(-1), int(channels)))

    # tensors
    def settle_dim_reads(self) -> None:
        """Freeze the channels whose count a Reshape reads at run time without carrying them where it puts it."""
        for tensor, axis, ids, reason, reshapes in self.dim_reads:
            if not all((r, tensor, axis) in self.dim_reads_ok for r in reshapes):
                self.freeze(ids, reason)

    def get(self, name: str) -> Layout | None:
        return self.chan.get(name) if name else None

    def set(self, name: str, chan: Layout | None) -> None:
        if name and chan is not None:
            self.chan[name] = chan
            if isinstance(chan, Block):
                self.lockstep_lines(chan.ids)  # a reshape back to [..., heads, head_dim] needs equal head widths

    def rank(self, name: str) -> int | None:
        shp = self.model.shape(name)
        return None if shp is None else len(shp)

    def const(self, name: str) -> np.ndarray | None:
        return self.model.array(name) if name and self.model.is_const(name) else None

    def block(self, name: str) -> Block | None:
        c = self.get(name)
        return c if isinstance(c, Block) else None

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
