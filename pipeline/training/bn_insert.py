"""Training-time BatchNormalization for graphs whose BN the exporter folded away (issue 26).

A plain eval-mode ``torch.onnx.export`` folds every BatchNormalization into the convolution before it. Such a graph
trains badly: fine-tuning a pruned, folded ResNet-56 with the settings that bring the BN-kept export back to its
original top-1 loses ~30 points, because the folded convs lose what BN gave their training (per-channel normalisation
of the batch, which keeps the effective learning rate of every channel in scale; Ioffe and Szegedy 2015).

So for training only, a BatchNormalization is put back after each convolution (and hidden Gemm) that has none
(:func:`insert`), initialised so that the network is unchanged at step 0: its running mean and variance are the
per-channel moments of the conv's output on calibration images, its scale ``sqrt(var + eps)`` and its shift the mean,
so in inference mode ``BN(y) = (y - mean) / sqrt(var + eps) * sqrt(var + eps) + mean = y``. The graph then trains as
batch norm (batch statistics, running statistics updated with the node's momentum), and when training ends every
inserted BN is folded back into its conv (:func:`fold_back`): ``W' = s W``, ``b' = s (b - mean) + beta`` with ``s =
gamma / sqrt(var + eps)``, written into a copy of the input graph, which so keeps its structure (a conv without a bias
gets one; no node is added).

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
OTHER_NORMS = (NORMS - {"BatchNormalization"}) | {"ReduceMean"}  # LayerNorm decomposed too: not a BN network
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
    axis: int = 0  # the weight's output-channel axis (a Gemm with transB=0 holds W as [in, out]: 1)


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
    """The layers a BatchNormalization can follow and fold back into: convs, and hidden fully-connected layers (a
    Gemm whose output is no graph output: the dynamo exporter folds ``BatchNorm1d`` into the ``Linear`` before it,
    the TorchScript one keeps it; a BN on the logits would only distort them). A graph that normalises with LayerNorm
    (the ONNX op or its ReduceMean decomposition) or GroupNorm was never a BN network: its Gemms get none. Each with a
    private constant weight (and bias), an output no normalisation reads; nodes named in ``skip`` (frozen ones)
    excluded."""
    out = []
    outputs = {o.name for o in model.graph.output}
    gemms = not any(n.op_type in OTHER_NORMS for n in model.graph.node)
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or n.name in skip or len(n.output) != 1:
            continue
        w = n.input[1]
        if not model.is_const(w) or len(model.consumers.get(w, [])) != 1:
            continue
        if n.op_type == "Conv" and model.array(w).ndim < 3:
            continue
        if n.op_type == "Gemm" and not (gemms and _foldable_gemm(model, n, outputs)):
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


def _foldable_gemm(model: Model, n: onnx.NodeProto, outputs: set[str]) -> bool:
    """A hidden Gemm a per-output-channel scale and shift fold into: plain ``A W + b`` (alpha = beta = 1, A not
    transposed), a 2-d weight, a bias of one value per output (or none), its output read by further layers."""
    if n.output[0] in outputs or attr(n, "transA", 0) or attr(n, "alpha", 1.0) != 1.0 or attr(n, "beta", 1.0) != 1.0:
        return False
    w = model.array(n.input[1])
    if w.ndim != 2 or not model.consumers.get(n.output[0]):
        return False
    b = n.input[2] if len(n.input) > 2 and n.input[2] else None
    return b is None or (model.is_const(b) and model.array(b).size == w.shape[_out_axis(n)])


def _out_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a layer's weight: 0 for a conv and a Gemm with transB=1, 1 for ``A @ W``."""
    return 1 if node.op_type == "Gemm" and not attr(node, "transB", 0) else 0


def _per_channel(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A per-output-channel vector shaped to broadcast over a weight of ``ndim`` dims along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def channel_moments(model: Model, tensors: list[str], data: Dataset, batch: int = 64) -> ChannelMoments:
    """Per-channel mean and variance of ``tensors`` over ``data`` (ONNX Runtime)."""
    moments = ChannelMoments()
    capture(model, tensors, data, moments, batch_size=batch)
    return moments


def insert(
    model: Model,
    calib: Dataset,
    *,
    skip: set[str] = frozenset(),
    batch: int = 64,
    rescale: bool = True,
    teacher: Model | None = None,
) -> tuple[Model, list[Inserted]]:
    """A copy of ``model`` with a BatchNormalization after every :func:`candidates` conv, unchanged in inference mode;
    the inserted BNs. Their statistics come from ``calib``.

    ``rescale``: each conv's output channel k is divided by c_k = rms(W_k) / sqrt(2 / fan_in) (its bias and the BN's
    statistics with it; BN makes the scale of its input irrelevant to the function), so every filter trains at the
    scale He initialisation gives and a BN-trained network's raw filters have. Folding BN into a conv multiplies its
    filters by gamma / sigma, which leaves some at a hundredth of that: Adam's steps of about ``lr`` per weight then
    turn such a filter's direction over in a few steps (measured: docs/finetune.md).

    ``teacher``: the BNs' affine parameters are set to the teacher's channel statistics instead (:func:`matched`),
    which changes the network: see there. Without it the copy computes exactly what ``model`` does."""
    convs = candidates(model, skip)
    if not convs:
        return model, []
    moments = channel_moments(model, [c.output[0] for c in convs], calib, batch)
    targets = matched(model, teacher, [c.output[0] for c in convs], calib, batch) if teacher is not None else {}
    out = model.copy()
    added: list[Inserted] = []
    nodes = []
    for node in out.graph.node:
        nodes.append(node)
        if node.name not in {c.name for c in convs}:
            continue
        y = node.output[0]
        mean, var = moments.mean(y), np.maximum(moments.var(y), 0.0)
        axis = _out_axis(node)
        c = _channel_scale(np.moveaxis(out.array(node.input[1]), axis, 0)) if rescale else np.ones(len(mean))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if rescale:
            w = out.array(node.input[1]).astype(np.float64)
            out.set_array(node.input[1], (w / _per_channel(c, w.ndim, axis)).astype(np.float32))
            if bias:
                out.set_array(bias, (out.array(bias).astype(np.float64) / c).astype(np.float32))
        # BN(y / c) with mean m / c and variance v / c^2 is y exactly when gamma = sqrt(v + eps c^2), beta = m
        gamma = np.sqrt(var + EPS * c**2).astype(np.float32)
        shift = mean.astype(np.float32)
        if y in targets:  # the teacher's channel statistics where a channel was matched
            t_mean, t_std, ok = targets[y]
            gamma, shift = np.where(ok, t_std, gamma).astype(np.float32), np.where(ok, t_mean, shift).astype(np.float32)
        mean, var = (mean / c).astype(np.float32), (var / c**2).astype(np.float32)
        base = f"{node.name or y}__carve_bn"
        pre = out.unique_name(f"{y}__carve_pre_bn")
        node.output[0] = pre
        names = [
            out.add_initializer(f"{base}.{k}", v)
            for k, v in (("scale", gamma), ("shift", shift), ("mean", mean), ("var", var))
        ]
        bn_name = out.unique_name(base)
        nodes.append(
            helper.make_node("BatchNormalization", [pre, *names], [y], bn_name, epsilon=EPS, momentum=MOMENTUM)
        )
        added.append(Inserted(node.name, bn_name, node.input[1], bias, *names, axis=axis))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.refresh(shapes=False)
    out.shapes = model.shapes
    return out, added


def matched(
    student: Model, teacher: Model, tensors: list[str], calib: Dataset, batch: int = 64, images: int = 64
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per tensor both graphs produce (a conv output, by name): for each student channel, the mean and standard
    deviation of the teacher channel it correlates with best, and whether that correlation exceeds 0.5.

    Why: in a graph that kept its BN, a pruned conv's BN trains with batch statistics, so from the first step each
    surviving channel comes out with the mean and spread it had in the original network (beta and gamma), whatever
    pruning did to its inputs — batch norm repairs the pruned network as it trains. Giving the inserted BN the
    teacher's statistics as its affine parameters does the same for a folded graph; without it, fine-tuning starts
    from the pruned network's shifted statistics and takes epochs to move gamma and beta there (measured:
    docs/finetune.md). Channels are matched by correlation on ``images`` calibration images, so no record of which
    channels pruning kept is needed (and repairs or earlier fine-tunes do not break the match)."""
    from carve.pipeline.data.batching import model_batches
    from carve.pipeline.data.capture import with_outputs
    from carve.pipeline.runtime.ort import session

    names = [
        t
        for t in tensors
        if t in teacher.producer
        and teacher.shape(t) is not None
        and student.shape(t) is not None
        and len(teacher.shape(t)) == len(student.shape(t))
        and teacher.shape(t)[2:] == student.shape(t)[2:]
    ]
    if not names:
        return {}
    sample = calib.sample(min(images, len(calib)), seed=0)
    runs = [session(with_outputs(m, names), threads=2) for m in (student, teacher)]
    acc: dict[str, list] = {}
    for x, _, _ in model_batches(student, sample, min(batch, 32)):
        s_out, t_out = (r.run(names, {m.input_names[0]: x}) for r, m in zip(runs, (student, teacher)))
        for name, s, t in zip(names, s_out, t_out):
            s = np.moveaxis(s, 1, 0).reshape(s.shape[1], -1).astype(np.float64)
            t = np.moveaxis(t, 1, 0).reshape(t.shape[1], -1).astype(np.float64)
            parts = (len(s[0]), s.sum(1), t.sum(1), (s * s).sum(1), (t * t).sum(1), s @ t.T)
            acc[name] = parts if name not in acc else [a + b for a, b in zip(acc[name], parts)]
    out = {}
    for name, (n, ss, ts, sq, tq, st) in acc.items():
        sm, tm = ss / n, ts / n
        sd, td = np.sqrt(np.maximum(sq / n - sm**2, 0)), np.sqrt(np.maximum(tq / n - tm**2, 0))
        corr = (st / n - np.outer(sm, tm)) / np.maximum(np.outer(sd, td), 1e-12)
        j = corr.argmax(axis=1)
        ok = corr[np.arange(len(j)), j] > 0.5
        exact = _same_bias(student, teacher, name)
        j, ok = np.where(exact >= 0, exact, j), ok | (exact >= 0)
        out[name] = (tm[j], td[j], ok)
    return out


def _same_bias(student: Model, teacher: Model, tensor: str) -> np.ndarray:
    """Per student channel of the conv producing ``tensor``, the teacher channel whose bias is bit-identical where
    exactly one is (pruning slices a folded conv's bias; -1 elsewhere): deep in a residual stage, channels correlate
    with their neighbours as much as with themselves, and a bias pins a channel where one survives unchanged."""
    s, t = student.producer[tensor], teacher.producer.get(tensor)
    found = -np.ones(student.shape(tensor)[1] if student.shape(tensor) else 0, dtype=np.int64)
    if t is None or len(s.input) < 3 or len(t.input) < 3 or not (s.input[2] and t.input[2]):
        return found
    if not (student.is_const(s.input[2]) and teacher.is_const(t.input[2])):
        return found
    sb, tb = student.array(s.input[2]).reshape(-1), teacher.array(t.input[2]).reshape(-1)
    if len(sb) != len(found):
        return found
    index: dict[bytes, list[int]] = {}
    for j, v in enumerate(tb):
        index.setdefault(v.tobytes(), []).append(j)
    for k, v in enumerate(sb):
        hits = index.get(v.tobytes(), [])
        if len(hits) == 1:
            found[k] = hits[0]
    return found


def _channel_scale(w: np.ndarray) -> np.ndarray:
    """Per output channel: rms(W_k) / sqrt(2 / fan_in) (1 for an all-zero filter)."""
    w = w.reshape(len(w), -1).astype(np.float64)
    rms = np.sqrt(np.mean(w**2, axis=1))
    c = rms / np.sqrt(2.0 / w.shape[1])
    return np.where(c > 0, c, 1.0)


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
        b = trained.array(ins.bias).astype(np.float64).reshape(-1) if ins.bias else np.zeros(w.shape[ins.axis])
        out.set_array(ins.weight, (w * _per_channel(s, w.ndim, ins.axis)).astype(np.float32))
        folded = (s * (b - mean) + beta).astype(np.float32)
        if ins.bias:
            out.set_array(ins.bias, folded.reshape(trained.array(ins.bias).shape))
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


def recalibrate(working: Model, original: Model, calib: Dataset, *, images: int = 256) -> tuple[Model, int]:
    """The BN repair for a graph without BN (``repairs: [bn]`` on a folded export): every conv's channels get back
    the mean and spread the original's same channel has, in topological order — what re-estimating a BN-kept graph's
    statistics does. A BN is inserted after each conv with the original's statistics as its affine (:func:`matched`),
    one forward pass in batch-statistics mode over ``images`` calibration images measures every BN's input *after*
    the corrections upstream of it (running statistics = that batch's), and the BNs are folded back. Returns the
    repaired copy and how many convs were re-normalised."""
    import torch

    from carve.pipeline.runtime.torch_graph import TorchGraph

    sample = calib.sample(min(images, len(calib)), seed=0)
    aug, inserted = insert(working, sample, teacher=original, rescale=False)
    if not inserted:
        return working, 0
    for ins in inserted:  # ONNX momentum 0: the running statistics become the batch's
        node = aug.nodes[ins.bn]
        for a in node.attribute:
            if a.name == "momentum":
                a.f = 0.0
    net = TorchGraph(aug, trainable=False)
    net.train()
    net.batch_statistics = True
    x, _ = sample.take(np.arange(len(sample)))
    with torch.no_grad():
        net(torch.from_numpy(x))
    net.write_back(aug, only={i for ins in inserted for i in (ins.mean, ins.var)})
    return fold_back(aug, working, inserted), len(inserted)
