"""The handler table: op type -> function(analyser, node). ``@handles("Relu", ...)`` registers one; ops without a
handler go to :func:`unknown`, which freezes everything they touch (never guess). :func:`dispatch` calls the handler
of a node; a handler sees channels split over several axes (a :class:`~carve.pipeline.graph.channels.elements.Block`:
attention heads) only when registered with ``blocks=True``: for any other op they are frozen first."""

from __future__ import annotations

from collections.abc import Callable

import onnx

from carve.pipeline.graph.channels.elements import Block, Layout
from carve.pipeline.graph.channels.state import Analyser


def q(node: onnx.NodeProto) -> str:
    """How messages name a node: ``Conv 'layer1.0.conv1'``."""
    return f"{node.op_type} {node.name!r}"


Handler = Callable[[Analyser, onnx.NodeProto], None]
ChannelHandler = Callable[[Analyser, onnx.NodeProto, Layout, "int | None"], None]


HANDLERS: dict[str, Handler] = {}
BLOCK_AWARE: set[str] = set()  # op types whose handler follows blocks (channels split over several axes)
DOMAIN_HANDLERS: dict[tuple[str, str], Handler] = {}  # (domain, op type) of ops outside the default domain


def handles(*ops: str, blocks: bool = False, domain: str = "") -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in ops:
            if domain:
                DOMAIN_HANDLERS[(domain, op)] = fn
                continue
            HANDLERS[op] = fn
            if blocks:
                BLOCK_AWARE.add(op)
        return fn

    return deco


def handles_channels(*ops: str, blocks: bool = False) -> Callable[[ChannelHandler], ChannelHandler]:
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
            if blocks:
                BLOCK_AWARE.add(op)
        return fn

    return deco


def dispatch(a: Analyser, node: onnx.NodeProto) -> None:
    """Run the handler of ``node`` (blocks frozen first for ops that do not follow them)."""
    if node.domain not in ("", "ai.onnx"):
        DOMAIN_HANDLERS.get((node.domain, node.op_type), unknown)(a, node)
        return
    if node.op_type not in BLOCK_AWARE:
        blocks = [i for i in node.input if isinstance(a.get(i), Block)]
        if blocks:
            for i in blocks:
                a.freeze(
                    a.get(i).ids,
                    f"{q(node)} reads channels split over several axes (attention heads), "
                    "which carve follows only through reshapes, transposes and attention products",
                )
                del a.chan[i]
            if all(a.get(i) is None for i in node.input):
                for o in node.output:
                    a.opaque(o, node.name, f"produced by {q(node)} from channels split over several axes")
                return
    HANDLERS.get(node.op_type, unknown)(a, node)


def unknown(a: Analyser, node: onnx.NodeProto) -> None:
    reason = f"{q(node)} is an op carve's channel analysis does not know"
    a.freeze_inputs(node, reason)
    for o in node.output:
        a.opaque(o, node.name, f"produced by {q(node)}, which carve does not know")
