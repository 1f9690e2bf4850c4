"""What must follow the channel counts when channels are removed: attributes and shape constants of nodes that do not
own channels but count them (Split sizes, Slice bounds, Pad pads, a depthwise conv's ``group``, Gather indices,
Reshape targets, Resize sizes / Expand shapes).

The analysis records them as plain data; :mod:`carve.pipeline.graph.surgery` applies them. Each record holds the channel
elements whose survival decides the new value (``keep(ids)`` is a boolean mask over them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Fix:
    node: str


@dataclass(frozen=True, eq=False)
class GroupFix(Fix):
    """A depthwise conv's ``group`` = how many of ``ids`` (one element per input channel) survive."""

    ids: np.ndarray


@dataclass(frozen=True, eq=False)
class SplitFix(Fix):
    """A Split on the channel axis: each output's size = survivors of its segment. A segment of a block (the Q, K and
    V parts of a per-head projection) is an array whose axis ``axis`` is the split one: its size is that axis's extent
    after pruning (:func:`carve.pipeline.graph.channels.layout.regular_shape`)."""

    segments: list[np.ndarray]
    axis: int | None = None


@dataclass(frozen=True, eq=False)
class SliceFix(Fix):
    """A Slice of the channel axis ``[start, end)`` of the input vector ``ids``; entry ``k`` of starts/ends."""

    k: int
    ids: np.ndarray
    start: int
    end: int


@dataclass(frozen=True, eq=False)
class BlockSliceFix(Fix):
    """A Slice of a block along its axis ``axis`` (entry ``k`` of starts/ends): the new start is the extent of the
    kept part of ``before``, the new end adds the extent of the kept part of ``part``."""

    k: int
    axis: int
    before: np.ndarray
    part: np.ndarray


@dataclass(frozen=True, eq=False)
class PadFix(Fix):
    """Constant channels added by a Pad before/after the input's channels; entry ``k`` of ``n_axes`` pad axes."""

    k: int
    n_axes: int
    before: np.ndarray
    after: np.ndarray


@dataclass(frozen=True, eq=False)
class GatherFix(Fix):
    """A Gather of channels ``idx`` from the input vector ``ids``: indices renumbered, removed ones dropped."""

    ids: np.ndarray
    idx: np.ndarray


@dataclass(frozen=True)
class Factors:
    """A target entry computed at run time as ``batch x c1 x c2 ...`` (a channel axis folded into the batch): the
    constants ``factors`` ((node, input index, flat position, value)) multiply to ``scale``; surgery changes one of
    them so that the product is the pruned size at batch 1."""

    scale: int
    factors: tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, eq=False)
class SlabGatherFix(Fix):
    """A scalar Gather of slab ``index`` along axis ``axis`` of the block ``label``: the index counts the slabs kept
    before it."""

    label: np.ndarray
    axis: int
    index: int


@dataclass(frozen=True, eq=False)
class ReshapeFix(Fix):
    """The target of a Reshape whose output dims at ``positions`` hold channels: after pruning they are the dims of
    the kept part of ``label`` (the element at every position of those dims,
    :func:`carve.pipeline.graph.channels.layout.regular_shape`). ``entries[k]`` locates the constant holding the target
    entry for ``positions[k]``: (node, input index, flat position) of the constant that node reads, or None where the
    entry needs no edit (-1, or read from a tensor that is pruned alike at run time)."""

    positions: list[int]
    entries: list[tuple[str, int, int] | Factors | None]
    label: np.ndarray


@dataclass(frozen=True, eq=False)
class ShapeEntryFix(Fix):
    """An explicit channel count (times ``inner``) at entry ``pos`` of input ``input_idx`` (Resize sizes, Expand)."""

    input_idx: int
    pos: int
    ids: np.ndarray
    inner: int
