"""The vocabulary of the channel analysis: elements and where they come from (:class:`Source`), the channel vector a
tensor carries (:class:`Chan`, or :class:`Block` when its channels are split over several axes, as attention heads
are), the constants surgery cuts (:class:`SliceRecord`), the statistics that make a removal inexact
(:class:`StatRecord`) and coupled channel spaces (:class:`Group`). See :mod:`carve.pipeline.graph.channels` and
docs/channels.md."""

from __future__ import annotations

import math
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
    """Channel information of one tensor: its channel axis and the element (or unit) at each index. ``folded``: the
    channels were folded into the batch (the axis holds ``batch x len(ids)`` positions, the batch outermost), as
    MobileViT's unfold ``x.reshape(B * C * n_h, ...)`` does."""

    axis: int
    ids: np.ndarray
    folded: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def axes(self) -> tuple[int, ...]:
        return (self.axis,)


@dataclass
class Block:
    """Channels split over several axes of one tensor: ``ids[i, j, ...]`` is the element at index i of ``axes[0]``,
    j of ``axes[1]``, ... (axes ascending). A projection's output reshaped to ``[tokens, heads, head_dim]`` carries a
    ``(heads, head_dim)`` block. Only handlers registered with ``blocks=True`` see blocks; every other op freezes
    them (:func:`carve.pipeline.graph.channels.handlers.table.dispatch`)."""

    axes: tuple[int, ...]
    ids: np.ndarray
    folded: int | None = None  # the axis (one of ``axes``) the batch is folded into, outermost (nn.MultiheadAttention)

    def __len__(self) -> int:
        return int(self.ids.size)


Layout = Chan | Block


def layout(axes, ids: np.ndarray) -> Layout:
    """A :class:`Chan` for one axis, a :class:`Block` for several (axes sorted, ids transposed to match)."""
    axes = tuple(int(x) for x in axes)
    ids = np.asarray(ids, dtype=np.int64)
    if len(axes) == 1:
        return Chan(axes[0], ids.reshape(-1))
    order = np.argsort(axes)
    return Block(tuple(axes[k] for k in order), np.transpose(ids, order))


def folded_axis(c: Layout | None) -> int | None:
    """The axis of ``c`` into which the batch is folded (outermost), or None."""
    if isinstance(c, Chan):
        return c.axis if c.folded else None
    return None if c is None else c.folded


def with_fold(c: Layout, axis: int | None) -> Layout:
    """``c`` with the batch folded into ``axis`` (one of its axes), or unfolded."""
    if isinstance(c, Chan):
        return Chan(c.axis, c.ids, folded=axis is not None)
    return Block(c.axes, c.ids, axis)


def parts(c: Layout) -> tuple[tuple[int, ...], np.ndarray]:
    """(axes, ids as an array with one dimension per axis) of a layout."""
    return c.axes, (c.ids if isinstance(c, Block) else c.ids.reshape(-1))


@dataclass(frozen=True)
class StatRecord:
    """``node`` computes a statistic over the channels ``ids`` (on axis ``axis`` of its input ``input``): a
    LayerNormalization over them, or the ReduceMean of a decomposed one. Removing any of them changes the statistic,
    so the removal is not exact; the reference of :func:`carve.pipeline.graph.surgery.masked_reference` computes it
    over the kept channels only. ``kind``: ``layernorm`` or ``mean``."""

    node: str
    kind: str
    input: str
    axis: int
    ids: np.ndarray = field(compare=False)


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
    # channels each unit of a slice spans in the tensors it is aligned in (a whole attention head: its head_dim);
    # --round-to applies to channels, so a slice of heads needs a multiple of round_to / gcd(round_to, span) units
    spans: list[int] = field(default_factory=list)
    # why removing a unit of this group is not exact (LayerNorm statistics); empty: exact
    inexact: list[str] = field(default_factory=list)
    # sets of slices that must lose the same number of units (the heads of one attention: equal head widths)
    lockstep: list[list[int]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.units)

    def round_to(self, k: int, round_to: int) -> int:
        """The alignment (in units) of slice ``k`` for a channel alignment ``round_to``."""
        span = self.spans[k] if k < len(self.spans) else 1
        return max(1, round_to // math.gcd(round_to, max(span, 1)))
