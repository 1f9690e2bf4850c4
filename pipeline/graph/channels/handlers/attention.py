"""Attention: the product of two activations (``q @ k^T``, ``attn @ v``), and the fused attention ops carve refuses.

A MatMul of two activations ``[..., M, K] x [..., K, N]`` sees channels in three roles:

* on the **contracted** axis K of both operands (Q and K of a head): channel k of one meets channel k of the other
  in one sum, so the two are unioned position by position. Removing such a pair removes its term from every score:
  exact against a reference that zeroes the pair's contribution (a :class:`ContractRecord`; surgery's
  :func:`~carve.pipeline.graph.surgery.zero_removed` masks that operand);
* on a **batch** axis of the product (the heads): a head's scores use only that head's channels. In ``heads`` mode
  (the default of :func:`~carve.pipeline.graph.channels.analyse`) all Q/K channels of a head become one unit, the
  scores carry the head on their batch axis, and ``attn @ v`` joins the head's V channels to it: a whole head is
  removed from Q, K, V and the output projection at once. In ``width`` mode the scores carry no channels: heads stay,
  and their Q/K width and V width are pruned, the same number in every head (lockstep sets);
* on a **free** axis (M of the left operand, N of the right: V's channels in ``attn @ v``): they pass through to the
  output.

Anything else (channels contracted with an untracked tensor, channels on both free axes) is frozen with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from carve.pipeline.graph.channels.elements import layout, parts
from carve.pipeline.graph.channels.handlers.table import handles, q
from carve.pipeline.graph.channels.state import Analyser


@dataclass(frozen=True)
class ContractRecord:
    """Input ``input_idx`` of MatMul ``node`` contracts channels with the other operand: ``ids`` (an array over the
    operand's axes ``axes``) are the channels at each position; the reference of a removal masks the removed ones."""

    node: str
    input_idx: int
    axes: tuple[int, ...]
    ids: np.ndarray = field(compare=False)


def matmul_activations(a: Analyser, node: onnx.NodeProto) -> None:
    """``node`` is a MatMul whose operands are both activations (neither is a constant weight)."""
    out = node.output[0]
    names = list(node.input[:2])
    ra, rb = a.rank(names[0]), a.rank(names[1])
    ca, cb = a.get(names[0]), a.get(names[1])
    if ca is None and cb is None:
        return
    if ra is None or rb is None or ra < 2 or rb < 2:
        _refuse(a, node, "multiplies two activations of unknown or too small rank")
        return
    r = a.rank(out) or max(ra, rb)
    # each operand's channel axes by role: ("batch", output axis) / ("k", None) / ("free", output axis)
    sides = []
    for idx, (c, rank) in enumerate(((ca, ra), (cb, rb))):
        if c is None:
            sides.append(None)
            continue
        axes, ids = parts(c)
        k_axis = rank - 1 if idx == 0 else rank - 2
        free_axis = rank - 2 if idx == 0 else rank - 1
        roles = []
        for x in axes:
            if x == k_axis:
                roles.append(("k", None))
            elif x == free_axis:
                roles.append(("free", r - 2 if idx == 0 else r - 1))
            else:
                roles.append(("batch", x + (r - rank)))
        sides.append((axes, ids, roles))
    has_k = [s is not None and any(ro[0] == "k" for ro in s[2]) for s in sides]
    has_free = [s is not None and any(ro[0] == "free" for ro in s[2]) for s in sides]
    if has_k[0] != has_k[1]:
        other = names[1] if has_k[0] else names[0]
        _refuse(a, node, f"contracts channels with {other!r}, whose channels carve does not track")
        return
    if has_free[0] and has_free[1]:
        _refuse(a, node, "multiplies channels of both operands into one output")
        return
    if has_k[0]:
        if any(has_free):
            _refuse(a, node, "contracts channels of an operand whose other axis holds channels too")
            return
        _contract(a, node, sides, r)
        return
    _carry(a, node, sides, r)


def _batch_dims(sides, r: int) -> list[int]:
    """Output batch axes on which either operand has channels."""
    return sorted({ro[1] for s in sides if s is not None for ro in s[2] if ro[0] == "batch"})


def _arrange(side, batch: list[int], extra: str | None) -> np.ndarray:
    """The operand's ids as an array over (``batch`` axes..., the axis of role ``extra``), size 1 where it has no
    channels (ready to broadcast against the other operand)."""
    axes, ids, roles = side
    order, dims = [], []
    for b in batch:
        if ("batch", b) in roles:
            order.append(roles.index(("batch", b)))
    if extra is not None:
        order.append(next(k for k, ro in enumerate(roles) if ro[0] == extra))
    arr = np.transpose(ids, order)
    for b in batch:
        dims.append(ids.shape[roles.index(("batch", b))] if ("batch", b) in roles else 1)
    if extra is not None:
        dims.append(arr.shape[-1])
    return arr.reshape(dims)


def _contract(a: Analyser, node: onnx.NodeProto, sides, r: int) -> None:
    """Channels on K of both operands: union position by position; heads mode: a head's Q/K channels are one unit."""
    batch = _batch_dims(sides, r)
    la, lb = (_arrange(s, batch, "k") for s in sides)
    if la.shape[-1] != lb.shape[-1]:
        _refuse(a, node, f"contracts {la.shape[-1]} channels with {lb.shape[-1]}")
        return
    try:
        la, lb = np.broadcast_arrays(la, lb)
    except ValueError:
        _refuse(a, node, "contracts channels whose heads do not line up")
        return
    a.union(la, lb)
    for idx, s in enumerate(sides):
        a.contracts.append(ContractRecord(node.name, idx, s[0], s[1]))
    if batch and a.attention == "heads":
        for line in la.reshape(-1, la.shape[-1]):
            a.union_all(line)
        a.span(la, la.shape[-1])
        a.set(node.output[0], layout(batch, la[..., 0]))


def _carry(a: Analyser, node: onnx.NodeProto, sides, r: int) -> None:
    """No channel is contracted: batch channels of both operands are joined line by line, free channels pass."""
    batch = _batch_dims(sides, r)
    both = [b for b in batch if all(s is not None and ("batch", b) in s[2] for s in sides)]
    if both:
        lines = [_lines(s, both) for s in sides]
        if lines[0].shape[0] != lines[1].shape[0]:
            _refuse(a, node, "multiplies channels whose heads do not line up")
            return
        for la, lb in zip(*lines):
            a.union_all(np.concatenate([la, lb]))
    src = next((s for s in sides if s is not None and any(ro[0] == "free" for ro in s[2])), None)
    if src is None:
        src = next(s for s in sides if s is not None)
    for s in sides:
        if s is not None and s is not src and any(ro[0] != "batch" or ro[1] not in both for ro in s[2]):
            _refuse(a, node, "multiplies channels of both operands that carve cannot line up")
            return
    axes, ids, roles = src
    a.set(node.output[0], layout([ro[1] for ro in roles], ids))


def _lines(side, batch: list[int]) -> np.ndarray:
    """The operand's ids grouped by position on the ``batch`` axes: (positions, elements per position)."""
    axes, ids, roles = side
    front = [roles.index(("batch", b)) for b in batch]
    rest = [k for k in range(len(roles)) if k not in front]
    arr = np.transpose(ids, front + rest)
    n = int(np.prod([ids.shape[k] for k in front], dtype=np.int64))
    return arr.reshape(n, -1)


def _refuse(a: Analyser, node: onnx.NodeProto, why: str) -> None:
    a.freeze_inputs(node, f"{q(node)} {why}")
    a.opaque(node.output[0], node.name, f"{q(node)} multiplies two activations")


_FUSED = {
    "Attention": "a fused attention (ONNX Runtime's transformer optimizer writes it)",
    "MultiHeadAttention": "a fused multi-head attention",
    "PackedAttention": "a fused attention",
    "PackedMultiHeadAttention": "a fused multi-head attention",
    "GroupQueryAttention": "a fused grouped-query attention",
    "DecoderMaskedMultiHeadAttention": "a fused attention",
    "SkipLayerNormalization": "a fused residual Add + LayerNorm",
    "SkipSimplifiedLayerNormalization": "a fused residual Add + RMSNorm",
    "SimplifiedLayerNormalization": "a fused RMSNorm",
    "EmbedLayerNormalization": "a fused embedding + LayerNorm",
}


def _refuse_fused(a: Analyser, node: onnx.NodeProto) -> None:
    what = _FUSED.get(node.op_type, "a fused op")
    reason = (
        f"{node.op_type} {node.name!r} ({node.domain or 'ai.onnx'}) is {what}: carve prunes heads and residual "
        "streams in the unfused graph; export without ORT's transformer fusions (plain torch.onnx.export) to prune it"
    )
    a.freeze_inputs(node, reason)
    for o in node.output:
        a.opaque(o, node.name, reason)


for _op in _FUSED:
    handles(_op, domain="com.microsoft")(_refuse_fused)
# ONNX's own Attention (opset 23) and RMSNormalization: not followed yet; refused with the same kind of reason
handles("Attention", "RMSNormalization")(_refuse_fused)
