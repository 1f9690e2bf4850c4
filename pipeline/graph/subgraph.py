"""The part of a graph one channel group touches, as a model of its own: what a latency table times.

A group's channels are created by its producers (convolutions, a depthwise conv's filters, a channel ``Pad``), flow
through per-channel ops (BatchNorm, activations, residual ``Add``) and end in its consumers (the next convolutions).
:func:`group_nodes` lists every node that reads or writes a tensor carrying one of the group's channels; changing the
group's width changes those nodes and no others. :func:`extract` cuts a set of nodes out of a model: tensors they
read from outside become graph inputs (batch dimension symbolic), tensors read outside (or nowhere) become graph
outputs, and the constants they read come along. Integer inputs (shape arithmetic) are followed back to their
producers so the extracted model computes them itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.graph.model import Model

_FLOAT = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def group_nodes(analysis: ChannelAnalysis, group: int) -> list[str]:
    """Names of the nodes that produce or read a tensor carrying a channel of ``group``, in graph order."""
    model = analysis.model
    units = set(int(u) for u in analysis.groups[group].units)
    touched: set[str] = set()
    for name, chan in analysis.tensors.items():
        if not len(chan) or not units.intersection(np.unique(analysis.unit_of[chan.ids]).tolist()):
            continue
        if name in model.producer:
            touched.add(model.producer[name].name)
        touched.update(n.name for n in model.consumers.get(name, []))
    return [n.name for n in model.graph.node if n.name in touched]


def extract(model: Model, nodes: Iterable[str], *, name: str = "subgraph") -> onnx.ModelProto:
    """The nodes ``nodes`` of ``model`` as a model of their own (see the module docstring)."""
    keep = set(nodes)
    keep |= _integer_ancestors(model, keep)
    order = [n for n in model.graph.node if n.name in keep]
    produced = {o for n in order for o in n.output if o}
    read_inside = {i for n in order for i in n.input if i}
    inputs, inits = [], []
    seen: set[str] = set()
    for n in order:
        for i in n.input:
            if not i or i in produced or i in seen:
                continue
            seen.add(i)
            if i in model.init:
                inits.append(model.init[i])
                continue
            inputs.append(_value_info(model, i, batch_symbolic=True))
    graph_outputs = set(model.output_names)
    outputs = []
    for n in order:
        for o in n.output:
            if not o:
                continue
            outside = any(c.name not in keep for c in model.consumers.get(o, []))
            if o in graph_outputs or outside or o not in read_inside:
                outputs.append(_value_info(model, o, batch_symbolic=True))
    g = helper.make_graph(order, name, inputs, outputs, initializer=inits)
    proto = helper.make_model(g, opset_imports=list(model.proto.opset_import))
    proto.ir_version = model.proto.ir_version
    return proto


def _integer_ancestors(model: Model, nodes: set[str]) -> set[str]:
    """Producers (transitively) of the non-float tensors the nodes read: shape arithmetic the subgraph needs."""
    found: set[str] = set()
    stack = [n for n in model.graph.node if n.name in nodes]
    while stack:
        n = stack.pop()
        for i in n.input:
            if not i or i in model.init or i not in model.producer:
                continue
            if model.dtype(i) in _FLOAT:
                continue
            p = model.producer[i]
            if p.name not in nodes and p.name not in found:
                found.add(p.name)
                stack.append(p)
    return found


def _value_info(model: Model, name: str, *, batch_symbolic: bool) -> onnx.ValueInfoProto:
    shape = model.shape(name)
    dtype = model.dtype(name)
    if dtype is None:
        raise CarveError(f"tensor {name!r} has no known type; cannot cut the graph there")
    if shape is None:
        return helper.make_tensor_value_info(name, dtype, None)
    dims: list[int | str | None] = list(shape)
    if batch_symbolic and dims:
        dims[0] = "N"
    return helper.make_tensor_value_info(name, dtype, [d if d is not None else "?" for d in dims])
