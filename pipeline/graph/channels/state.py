"""The state threaded through the channel handlers while the graph is walked: new elements, the channel vector of
every tensor, and the unions, freezes, slices and fixes the handlers record (:mod:`carve.pipeline.graph.channels`)."""

from __future__ import annotations

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import Chan, Kind, SliceRecord, Source
from carve.pipeline.graph.channels.fixes import Fix
from carve.pipeline.graph.model import Model


class Analyser:
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
