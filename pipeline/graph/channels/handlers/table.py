"""The handler table: op type -> function(analyser, node). ``@handles("Relu", ...)`` registers one; ops without a
handler go to :func:`unknown`, which freezes everything they touch (never guess)."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from carve.pipeline.graph.channels.elements import Chan
from carve.pipeline.graph.channels.state import Analyser


def q(node: onnx.NodeProto) -> str:
    """How messages name a node: ``Conv 'layer1.0.conv1'``."""
    return f"{node.op_type} {node.name!r}"


Handler = Callable[[Analyser, onnx.NodeProto], None]
ChannelHandler = Callable[[Analyser, onnx.NodeProto, Chan, "int | None"], None]


HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return deco


def handles_channels(*ops: str) -> Callable[[ChannelHandler], ChannelHandler]:
    """Register a handler that acts only when the node's first input carries tracked channels; it receives that
    input's channel vector and rank (None when unknown). A node whose data input carries none needs no handling."""

    def deco(fn: ChannelHandler) -> ChannelHandler:
        def handler(a: Analyser, node: onnx.NodeProto) -> None:
            c = a.get(node.input[0]) if node.input else None
            if c is not None:
                fn(a, node, c, a.rank(node.input[0]))

        handler.__name__ = handler.__qualname__ = fn.__name__
        for op in ops:
            HANDLERS[op] = handler
        return fn

    return deco


def unknown(a: Analyser, node: onnx.NodeProto) -> None:
    reason = f"{q(node)} is an op carve's channel analysis does not know"
    a.freeze_inputs(node, reason)
    for o in node.output:
        a.opaque(o, node.name, f"produced by {q(node)}, which carve does not know")
