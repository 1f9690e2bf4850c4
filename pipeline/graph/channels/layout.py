"""Following channels through a change of layout (Reshape, Flatten): which output axes carry which channels, and what
the shape of a pruned tensor is.

A Reshape keeps row-major order, so input and output dims split into **groups** whose products match (``[B, 56, 56,
96] -> [B, 8, 7, 8, 7, 96]``: ``56 = 8*7`` twice, ``96 = 96``). Only the groups that contain a channel axis matter:
carve builds a *label* array over them (the element at every position), reshapes it as the op does, and reads off the
output axes along which it varies. That covers every case with one rule:

* the channel axis kept as it is, the dims around it regrouped (window partition and reverse, patch flatten);
* channels merged with the dims after or before them (``Flatten -> Gemm``, NHWC -> ``[B, H*W*C]``): one output axis
  whose vector repeats each channel;
* the channel axis split into several (``[T, 3*H*D] -> [T, 3, H, D]``, attention heads): a
  :class:`~carve.pipeline.graph.channels.elements.Block`;
* a block merged back (``[T, H, D] -> [T, H*D]``).

Dims whose size is unknown (a dynamic batch) may only be regrouped among themselves, away from the channels. Anything
else (a layout whose labels are not a tiled vector or a block of distinct elements) is refused with a reason.

After pruning, :func:`regular_shape` gives the new dims of a label block from the kept mask: slabs removed entirely
drop out, and the lines along the last axis must keep equal counts (equal head widths).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from carve.pipeline.graph.channels.elements import Block, Layout, layout, parts

MAX_LABEL = 1 << 24  # elements of a label array; beyond this a layout change is refused rather than followed

Dims = Sequence[int | None]


def align(ins: Dims, outs: Dims) -> list[tuple[list[int], list[int], bool]] | None:
    """Groups of input and output axes with equal products, in order, as (in_axes, out_axes, known). Dims of unknown
    size end up in one group (known=False) with whatever could not be matched around them. None when the shapes
    cannot be the two sides of a reshape."""
    n, m = len(ins), len(outs)
    left: list[tuple[list[int], list[int], bool]] = []
    i = j = 0
    while i < n and j < m:
        g = _grow(ins, outs, i, j, +1)
        if g is None:
            break
        left.append(g)
        i, j = g[0][-1] + 1, g[1][-1] + 1
    right: list[tuple[list[int], list[int], bool]] = []
    ri, rj = n - 1, m - 1
    while ri >= i and rj >= j:
        g = _grow(ins, outs, ri, rj, -1, lo=(i, j))
        if g is None:
            break
        right.append(g)
        ri, rj = g[0][0] - 1, g[1][0] - 1
    middle_in, middle_out = list(range(i, ri + 1)), list(range(j, rj + 1))
    groups = left
    if middle_in or middle_out:
        known = all(d is not None for d in [*(ins[k] for k in middle_in), *(outs[k] for k in middle_out)])
        if known and _prod(ins[k] for k in middle_in) != _prod(outs[k] for k in middle_out):
            return None
        if not middle_in or not middle_out:
            # one side empty: the other must be all ones (a Reshape that adds or drops size-1 axes)
            rest = [ins[k] for k in middle_in] + [outs[k] for k in middle_out]
            if any(d != 1 for d in rest):
                return None
        groups.append((middle_in, middle_out, known))
    groups.extend(reversed(right))
    return groups


def _grow(ins: Dims, outs: Dims, i: int, j: int, step: int, lo: tuple[int, int] = (0, 0)):
    """The smallest group starting at (i, j) and growing in direction ``step`` whose products match, or None."""
    if ins[i] is None or outs[j] is None:
        return None
    a, b = [i], [j]
    pa, pb = int(ins[i]), int(outs[j])
    while pa != pb:
        if pa < pb:
            k = a[-1] + step if step > 0 else a[0] + step
            if not (lo[0] <= k < len(ins)) or ins[k] is None:
                return None
            a = a + [k] if step > 0 else [k] + a
            pa *= int(ins[k])
        else:
            k = b[-1] + step if step > 0 else b[0] + step
            if not (lo[1] <= k < len(outs)) or outs[k] is None:
                return None
            b = b + [k] if step > 0 else [k] + b
            pb *= int(outs[k])
    return a, b, True


def _prod(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64))


def relabel(c: Layout, ins: Dims, outs: Dims) -> tuple[Layout, list[int], np.ndarray] | str:
    """Follow layout ``c`` of a tensor of shape ``ins`` reshaped to ``outs``. Returns the output layout, the output
    axes of the groups holding channels and the label array over them (what surgery needs to fix the target shape),
    or the reason it cannot be followed."""
    if ins is None or outs is None:
        return "reshapes a tensor of unknown shape"
    groups = align(ins, outs)
    if groups is None:
        return "reshapes to a shape carve cannot match with its input"
    axes, ids = parts(c)
    chan_in: list[int] = []
    chan_out: list[int] = []
    for gi, go, known in groups:
        if set(gi) & set(axes):
            if not known:
                return "reshapes the channel axis together with dimensions of unknown size"
            chan_in += gi
            chan_out += go
    if any(ins[k] is None for k in chan_in) or any(outs[k] is None for k in chan_out):
        return "reshapes the channel axis together with dimensions of unknown size"
    size = _prod(ins[k] for k in chan_in)
    if size > MAX_LABEL:
        return "reshapes the channels together with too many other positions to follow"
    in_dims = [int(ins[k]) if k in chan_in else 1 for k in range(len(ins))]
    placed = [1] * len(ins)
    for k, ax in enumerate(axes):
        placed[ax] = ids.shape[k]
    label = np.broadcast_to(ids.reshape(placed), in_dims)
    out_dims = [int(outs[k]) if k in chan_out else 1 for k in range(len(outs))]
    label = label.reshape(out_dims)
    varying = [k for k in range(len(outs)) if out_dims[k] > 1 and not (label == label.take([0], axis=k)).all()]
    if not varying:
        return "reshapes a single channel"
    index = tuple(slice(None) if k in varying else 0 for k in range(len(outs)))
    new_ids = label[index]
    new = layout(varying, new_ids)
    if not _followable(new):
        return "rearranges the channels in a way carve cannot follow"
    return new, sorted(chan_out), label.reshape([out_dims[k] for k in sorted(chan_out)])


def _followable(c: Layout) -> bool:
    """A vector whose channels repeat as ``tile(repeat(u, inner), outer)`` (u distinct), or a block of distinct
    elements."""
    if isinstance(c, Block):
        return len(np.unique(c.ids)) == c.ids.size
    return tiled(c.ids) is not None


def tiled(v: np.ndarray) -> tuple[int, int] | None:
    """(inner, outer) when ``v == tile(repeat(u, inner), outer)`` with u distinct; else None."""
    v = np.asarray(v).reshape(-1)
    n = len(v)
    if n == 0:
        return None
    change = np.flatnonzero(v != v[0])
    inner = int(change[0]) if len(change) else n
    if n % inner or not (v.reshape(-1, inner) == v[::inner, None]).all():
        return None
    u = v[::inner]
    again = np.flatnonzero(u[1:] == u[0])
    period = int(again[0]) + 1 if len(again) else len(u)
    if len(u) % period or not (u.reshape(-1, period) == u[:period]).all():
        return None
    if len(np.unique(u[:period])) != period:
        return None
    return inner, len(u) // period


def regular_shape(kept: np.ndarray) -> tuple[int, ...]:
    """The dims of a label block after pruning, from its kept mask: along every axis, indices whose slab lost every
    position drop out; then every line along the last axis must keep the same count (heads keep equal widths).
    Raises AssertionError when the mask is not regular (the analysis and the planner guarantee it is)."""
    m = np.asarray(kept, dtype=bool)
    if m.ndim == 0:
        return ()
    for ax in range(m.ndim):
        others = tuple(k for k in range(m.ndim) if k != ax)
        m = np.compress(m.any(axis=others) if others else m, m, axis=ax)
    if m.size == 0:
        return tuple(0 for _ in range(m.ndim))
    counts = m.reshape(-1, m.shape[-1]).sum(axis=1)
    if not (counts == counts[0]).all():
        raise AssertionError(f"irregular removal: lines keep {sorted(set(counts.tolist()))} positions")
    shape = (*m.shape[:-1], int(counts[0]))
    return shape
