"""What a written model must not carry: initializers no node reads, ``value_info`` for tensors the graph no longer
has, and opset imports of domains no node uses.

Pruning, decomposition and merging replace nodes and weights; what they leave behind costs file size, and ONNX Runtime
prints a warning for every unused initializer when the file is loaded (``Removing initializer ... It is not used by
any node``). :func:`compact` removes all three, in place, in the main graph and in every subgraph (If/Loop/Scan bodies
read names of the enclosing scope, which count as used there). Nothing it removes can change what the model computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from carve.pipeline.graph.model import outer_names

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Removed:
    """Names removed by :func:`compact`."""

    initializers: list[str] = field(default_factory=list)
    value_info: list[str] = field(default_factory=list)
    opsets: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.initializers or self.value_info or self.opsets)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for n in graph.node:
        yield n
        for sg in _subgraphs(n):
            yield from _nodes(sg)


def _read(graph: onnx.GraphProto) -> set[str]:
    """Names the graph's nodes read (subgraphs' reads of this scope included) and its outputs."""
    read = {o.name for o in graph.output}
    for n in graph.node:
        read.update(i for i in n.input if i)
        read.update(outer_names(n))
    return read


def _drop_initializers(graph: onnx.GraphProto, read: set[str], removed: Removed) -> None:
    names = {t.name for t in graph.initializer if t.name not in read}
    if names:
        keep = [t for t in graph.initializer if t.name in read]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        # an initializer listed as a graph input (IR < 4 style) is a constant, not an interface: it goes with it
        inputs = [i for i in graph.input if i.name not in names]
        if len(inputs) != len(graph.input):
            del graph.input[:]
            graph.input.extend(inputs)
        removed.initializers += sorted(names)
    sparse = {t.values.name for t in graph.sparse_initializer if t.values.name not in read}
    if sparse:
        keep = [t for t in graph.sparse_initializer if t.values.name not in sparse]
        del graph.sparse_initializer[:]
        graph.sparse_initializer.extend(keep)
        removed.initializers += sorted(sparse)


def _drop_value_info(graph: onnx.GraphProto, read: set[str], removed: Removed) -> None:
    present = read | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for n in graph.node:
        present.update(o for o in n.output if o)
    stale = [v.name for v in graph.value_info if v.name not in present]
    if stale:
        keep = [v for v in graph.value_info if v.name in present]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        removed.value_info += stale


def _compact_graph(graph: onnx.GraphProto, removed: Removed) -> None:
    read = _read(graph)
    _drop_initializers(graph, read, removed)
    _drop_value_info(graph, read, removed)
    for n in graph.node:
        for sg in _subgraphs(n):
            _compact_graph(sg, removed)


def compact(proto: onnx.ModelProto) -> Removed:
    """Remove unused initializers, stale ``value_info`` and unused opset imports from ``proto`` in place; return what
    was removed. The default domain's import always stays (it names the model's opset)."""
    removed = Removed()
    _compact_graph(proto.graph, removed)
    used = {n.domain for n in _nodes(proto.graph)}
    for f in proto.functions:
        used.add(f.domain)
        used.update(n.domain for n in f.node)
    used.update(DEFAULT_DOMAINS)
    if any(o.domain not in used for o in proto.opset_import):
        keep = [o for o in proto.opset_import if o.domain in used]
        removed.opsets = [o.domain for o in proto.opset_import if o.domain not in used]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)
    return removed
