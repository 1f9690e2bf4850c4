"""The vocabulary of the channel analysis: elements and where they come from (:class:`Source`), the channel vector a
tensor carries (:class:`Chan`), the constants surgery cuts (:class:`SliceRecord`) and coupled channel spaces
(:class:`Group`). See :mod:`carve.pipeline.graph.channels` and docs/channels.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


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


@dataclass
class Group:
    id: int
    units: np.ndarray
    sources: list[str]
    slices: list[np.ndarray]  # units partitioned by the set of tensors they appear in

    @property
    def width(self) -> int:
        return len(self.units)
