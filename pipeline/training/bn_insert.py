"""Training-time BatchNormalization for graphs whose BN the exporter folded away (issue 26).

A plain eval-mode ``torch.onnx.export`` folds every BatchNormalization into the convolution before it. Such a graph
trains badly: fine-tuning a pruned, folded ResNet-56 with the settings that bring the BN-kept export back to its
original top-1 loses ~30 points, because the folded convs lose what BN gave their training (per-channel normalisation
of the batch, which keeps the effective learning rate of every channel in scale; Ioffe and Szegedy 2015).

So for training only, a BatchNormalization is put back after each convolution that has none (:func:`insert`),
initialised so that the network is unchanged at step 0: its running mean and variance are the per-channel moments of
the conv's output on calibration images, its scale ``sqrt(var + eps)`` and its shift the mean, so in inference mode
``BN(y) = (y - mean) / sqrt(var + eps) * sqrt(var + eps) + mean = y``. The graph then trains as batch norm (batch
statistics, running statistics updated with the node's momentum), and when training ends every inserted BN is folded
back into its conv (:func:`fold_back`): ``W' = s W``, ``b' = s (b - mean) + beta`` with ``s = gamma / sqrt(var +
eps)``, written into a copy of the input graph, which so keeps its structure (a conv without a bias gets one; no node
is added).

Which graphs: :func:`decide` reads the ``bn`` option — ``auto`` inserts when the graph has no BatchNormalization to
train, ``insert`` always (after the convs that have none), ``keep`` trains the graph as it is, ``off`` inserts nothing
and runs the graph's own BN with its running statistics (its affine parameters still train).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from carve.pipeline.data.capture import ChannelMoments, capture
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model, attr

MODES = ("auto", "insert", "keep", "off")
NORMS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
EPS = 1e-5
MOMENTUM = 0.9  # ONNX's: running = momentum * running + (1 - momentum) * batch (torch's 0.1)


@dataclass(frozen=True)
class Inserted:
    """One inserted BatchNormalization: the conv it follows and the initializers of both."""

    conv: str  # node name
    bn: str  # node name
    weight: str
    bias: str | None  # the conv's bias initializer, None when it has none
    scale: str
    shift: str
    mean: str
    var: str


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise CarveError(f"`bn` must be one of {', '.join(MODES)}, got {mode!r}")


def has_batchnorm(model: Model) -> bool:
    return any(n.op_type == "BatchNormalization" for n in model.graph.node)


def decide(mode: str, model: Model) -> bool:
    """Whether ``mode`` inserts BatchNormalization into ``model`` for training."""
    check_mode(mode)
    return mode == "insert" or (mode == "auto" and not has_batchnorm(model))


def candidates(model: Model, skip: set[str] = frozenset()) -> list[onnx.NodeProto]:
    """The convs a BatchNormalization can follow and fold back into: 4-d output with a known channel count, a private
    constant weight (and bias), an output no normalisation reads; nodes named in ``skip`` (frozen ones) excluded."""
    out = []
    for n in model.graph.node:
        if n.op_type != "Conv" or n.name in skip or len(n.output) != 1:
            continue
        w = n.input[1]
        if not model.is_const(w) or len(model.consumers.get(w, [])) != 1 or model.array(w).ndim < 3:
            continue
        b = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if b is not None and (not model.is_const(b) or len(model.consumers.get(b, [])) != 1):
            continue
        if model.array(w).dtype != np.float32:
            continue
        if any(c.op_type in NORMS for c in model.consumers.get(n.output[0], [])):
            continue
        out.append(n)
    return out


def channel_moments(model: Model, tensors: list[str], data: Dataset, batch: int = 64) -> ChannelMoments:
    """Per-channel mean and variance of ``tensors`` over ``data`` (ONNX Runtime)."""
    moments = ChannelMoments()
    capture(model, tensors, data, moments, batch_size=batch)
    return moments


def insert(
    model: Model, calib: Dataset, *, skip: set[str] = frozenset(), batch: int = 64
) -> tuple[Model, list[Inserted]]:
    """A copy of ``model`` with a BatchNormalization after every :func:`candidates` conv, unchanged in inference mode;
    the inserted BNs. Their statistics come from ``calib``."""
    convs = candidates(model, skip)
    if not convs:
        return model, []
    moments = channel_moments(model, [c.output[0] for c in convs], calib, batch)
    out = model.copy()
    added: list[Inserted] = []
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        if node.name not in {c.name for c in convs}:
            continue
        y = node.output[0]
        mean = moments.mean(y).astype(np.float32)
        var = np.maximum(moments.var(y), 0.0).astype(np.float32)
        base = f"{node.name or y}__carve_bn"
        pre = out.unique_name(f"{y}__carve_pre_bn")
        node.output[0] = pre
        names = [
            out.add_initializer(f"{base}.{k}", v)
            for k, v in (("scale", np.sqrt(var + EPS)), ("shift", mean), ("mean", mean), ("var", var))
        ]
        bn_name = out.unique_name(base)
        nodes.append(
            helper.make_node("BatchNormalization", [pre, *names], [y], bn_name, epsilon=EPS, momentum=MOMENTUM)
        )
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        added.append(Inserted(node.name, bn_name, node.input[1], bias, *names))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.refresh(shapes=False)
    out.shapes = model.shapes
    return out, added


def fold_back(trained: Model, original: Model, inserted: list[Inserted]) -> Model:
    """A copy of ``original`` carrying the values of ``trained`` (the graph :func:`insert` made, after training) with
    every inserted BatchNormalization folded into its conv: the input's structure, the trained network's function.

    Initializers both graphs share are copied as they are; a conv without a bias gets one (``<conv>.bias``)."""
    out = original.copy()
    for name in out.init:
        if name in trained.init:
            out.set_array(name, trained.array(name))
    for ins in inserted:
        bn = trained.nodes[ins.bn]
        gamma, beta, mean, var = (
            trained.array(i).astype(np.float64) for i in (ins.scale, ins.shift, ins.mean, ins.var)
        )
        s = gamma / np.sqrt(var + float(attr(bn, "epsilon", EPS)))
        w = trained.array(ins.weight).astype(np.float64)
        b = trained.array(ins.bias).astype(np.float64) if ins.bias else np.zeros(len(w))
        out.set_array(ins.weight, (w * s.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32))
        folded = (s * (b - mean) + beta).astype(np.float32)
        if ins.bias:
            out.set_array(ins.bias, folded)
        else:
            conv = out.consumers[ins.weight][0]  # a private weight: its one reader (names may be empty)
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = out.add_initializer(f"{ins.conv or ins.weight}.bias", folded)
    out.refresh(shapes=False)
    out.shapes = original.shapes
    return out


def describe(mode: str, inserted: list[Inserted], model: Model) -> dict:
    """What the summary (and the model's history) says about normalisation during training."""
    kept = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if inserted:
        what = f"inserted {len(inserted)} BatchNormalization for training, folded back into their convs"
    elif mode == "off":
        what = "no batch statistics: the graph's BatchNormalization used its running statistics"
    elif kept:
        what = f"trained the graph's {kept} BatchNormalization as batch norm"
    else:
        what = "no BatchNormalization trained"
    return {"mode": mode, "inserted": len(inserted), "graph_batchnorm": kept, "what": what}
