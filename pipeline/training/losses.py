"""Fine-tuning losses, and which distillation loss each graph output gets.

* Distillation of class logits (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015):
  KL(teacher_T || student_T) of the softened outputs at temperature T, times T^2 so its gradients keep their scale as
  T changes. The temperature may vary over the training (:class:`carve.pipeline.training.schedule.Temperature`, SFP).
* Box / regression tensors (the raw heads of a YOLO-style detector, box deltas): smooth-L1 (or MSE) of the difference
  divided by the teacher's spread per channel (its standard deviation over the batch and positions), so channels in
  pixels and channels in logits weigh alike (the scale-free regression distillation of Chen et al., "Learning
  Efficient Object Detection Models with Knowledge Distillation", NeurIPS 2017, with the teacher as the bound).
* Dense maps (segmentation logits N x C x H x W): per-position KL over the channel axis at temperature T, averaged over
  the positions (the pixel-wise distillation of Liu et al., "Structured Knowledge Distillation for Semantic
  Segmentation", CVPR 2019).
* Raw YOLO heads (N x A(5 + C) x H x W, the layout the model's ``carve.detection`` metadata declares): objectness-scaled
  distillation (Mehta and Ozturk, "Object detection at 200 Frames Per Second", ECCV workshops 2018): the Bernoulli KL of
  the objectness at every anchor and cell, and, weighted by the teacher's objectness, the box offsets as regression
  (smooth-L1 in units of the teacher's spread) and the class logits as KL at temperature T. The offsets and classes of
  cells where the teacher sees nothing are never decoded, so they are not distilled.
* Embeddings: 1 - cosine similarity along the feature axis (direction is what retrieval uses; the norm is not).
* Cross-entropy with the labels, when the data has them.
* A feature loss on matched intermediate tensors (FitNets-style hints, Romero et al., ICLR 2015): the mean squared
  difference of a tensor present with the same shape in both graphs, relative to the teacher tensor's mean square.

:func:`output_losses` decides the loss of every output from what the output is (the model's own ``carve.outputs``
metadata, the op that produces it, its name, its shape), and a user's per-output choice overrides it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from carve.pipeline.errors import CarveError

# the loss names a user may give per output, and what each is for
LOSSES = {
    "kl": "class logits: KL at temperature T",
    "smooth-l1": "boxes / regression: smooth-L1 scaled by the teacher's spread",
    "mse": "boxes / regression: squared error scaled by the teacher's spread",
    "channel-kl": "dense maps: per-position KL over the channel axis at temperature T",
    "cosine": "embeddings: 1 - cosine similarity",
    "yolo": "raw YOLO heads (carve.detection metadata): objectness KL, boxes and classes weighted by objectness",
    "none": "not distilled",
}
# what an output is -> its default loss
KIND_LOSS = {
    "logits": "kl",
    "regression": "smooth-l1",
    "dense": "channel-kl",
    "embedding": "cosine",
    "detection": "yolo",
}

_NAME_HINTS = [  # (words an output name starts a part with, kind); the first match wins
    ("box|bbox|loc|reg|coord|delta|offset|landmark|depth", "regression"),
    ("emb|feat|descr|vector|hidden|pool", "embedding"),
    ("mask|seg|heatmap|semantic", "dense"),
    ("logit|class|cls|score|prob", "logits"),
]


@dataclass(frozen=True)
class OutputLoss:
    """The loss of one graph output, and why it was chosen."""

    output: str
    loss: str
    kind: str  # logits | regression | dense | embedding | detection | given
    why: str
    params: dict = field(default_factory=dict, compare=False)  # what the loss needs to know (a YOLO head's layout)


def output_kind(model, name: str) -> tuple[str, str]:
    """(kind, why) of graph output ``name`` of ``model``: a head its ``carve.detection`` metadata decodes, its
    ``carve.outputs`` metadata, an L2 normalisation producing it, its name, then its shape (N x C: logits,
    N x C x H x W: dense map, anything else: regression)."""
    if name in _heads(model):
        return "detection", "a YOLO head (carve.detection metadata)"
    declared = _declared(model)
    if name in declared:
        return declared[name], "declared in the model's carve.outputs metadata"
    node = model.producer.get(name)
    if node is not None and node.op_type == "LpNormalization":
        return "embedding", "L2-normalised (LpNormalization)"
    if node is not None and node.op_type == "Div" and _is_norm(model, node.input[1]):
        return "embedding", "divided by its norm"
    for words, kind in _NAME_HINTS:
        hit = re.search(rf"(?:^|[^a-z])({words})", name.lower())
        if hit:
            return kind, f"its name says {hit.group(1)!r}"
    shape = model.shape(name)
    if shape is None:
        return "regression", "shape unknown"
    dims = list(shape[1:])
    if len(dims) == 1 and (dims[0] is None or dims[0] > 1):
        return "logits", f"N x {dims[0]} (one score per class)"
    if len(dims) == 3 and dims[0] != 1 and (dims[1] or 2) * (dims[2] or 2) > 1:
        return "dense", "N x C x H x W (one distribution per position)"
    return "regression", f"shape {['N', *dims]}"


def output_losses(student, teacher, overrides: dict[str, str] | None = None) -> list[OutputLoss]:
    """The loss of every output of ``student`` (distilled from ``teacher``'s output of the same name)."""
    overrides = dict(overrides or {})
    check_overrides(overrides)
    names = list(student.output_names)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise CarveError(
            f"`output_losses`: the model has no output {unknown[0]!r} (outputs: {', '.join(names)})",
            hint="`carve inspect` lists the outputs",
        )
    missing = [n for n in names if n not in teacher.output_names]
    if missing:
        raise CarveError(
            f"the teacher has no output {missing[0]!r} (its outputs: {', '.join(teacher.output_names)})",
            hint="distil from the model the student was made from (its outputs keep their names)",
        )
    plan = []
    heads = _heads(student)
    for n in names:
        params = heads.get(n, {})
        if n in overrides:
            if overrides[n] == "yolo" and not params:
                raise CarveError(
                    f"`output_losses` {n}=yolo: the model's carve.detection metadata does not describe {n!r}",
                    hint="yolo needs the head's anchors and classes (docs/finetune.md)",
                )
            plan.append(OutputLoss(n, overrides[n], "given", "chosen by the user", params))
        else:
            kind, why = output_kind(student, n)
            plan.append(OutputLoss(n, KIND_LOSS[kind], kind, why, params))
    if all(p.loss == "none" for p in plan):
        raise CarveError("`output_losses`: every output is `none`: nothing to distil")
    return plan


def check_overrides(overrides: dict[str, str]) -> None:
    for name, loss in overrides.items():
        if loss not in LOSSES:
            raise CarveError(f"`output_losses` {name}={loss}: unknown loss", hint=f"use one of {', '.join(LOSSES)}")


def distil(loss: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, **params) -> torch.Tensor:
    """The named distillation loss of one output (``teacher`` carries no gradient; ``params``: a YOLO head's
    ``anchors`` and ``classes``)."""
    if loss == "yolo":
        return yolo_head(student, teacher, temperature, anchors=params["anchors"], classes=params["classes"])
    if loss == "kl":
        return distillation(student, teacher, temperature)
    if loss in ("smooth-l1", "mse"):
        return regression(student, teacher, squared=loss == "mse")
    if loss == "channel-kl":
        return channel_distillation(student, teacher, temperature)
    if loss == "cosine":
        return cosine(student, teacher)
    raise CarveError(f"unknown distillation loss {loss!r}; valid: {', '.join(LOSSES)}")


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = float(temperature)
    s = F.log_softmax(student.reshape(len(student), -1) / t, dim=1)
    p = F.log_softmax(teacher.reshape(len(teacher), -1) / t, dim=1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def spread(teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's standard deviation per channel (axis 1) over the batch and every other axis, broadcastable
    against it; floored at 1e-3 of the largest so constant channels do not blow the loss up."""
    x = teacher.detach()
    if x.dim() < 2:
        return x.std().clamp_min(1e-6).reshape(())
    axes = [0, *range(2, x.dim())]
    std = x.std(dim=axes, keepdim=True) if x.numel() > x.shape[1] else x.abs()
    return std.clamp_min(float(std.max()) * 1e-3 + 1e-8)


def regression(student: torch.Tensor, teacher: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
    """Smooth-L1 (beta 1) or squared error of the difference in units of the teacher's per-channel spread."""
    scale = spread(teacher)
    diff_s, diff_t = student / scale, teacher / scale
    if squared:
        return F.mse_loss(diff_s, diff_t)
    return F.smooth_l1_loss(diff_s, diff_t, beta=1.0)


def channel_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL over the channel axis (1) at every position, averaged over batch and positions."""
    t = float(temperature)
    s = F.log_softmax(student / t, dim=1)
    p = F.log_softmax(teacher / t, dim=1)
    per_position = (p.exp() * (p - s)).sum(dim=1)
    return per_position.mean() * (t * t)


def yolo_head(student: torch.Tensor, teacher: torch.Tensor, temperature: float, *, anchors: int, classes: int):
    """Objectness-scaled distillation of a raw YOLO head N x A(5 + C) x H x W: Bernoulli KL of the objectness
    everywhere, plus smooth-L1 of the box offsets (in units of the teacher's spread) and T^2 KL of the class logits,
    both weighted by the teacher's objectness probability."""
    n, _, h, w = student.shape
    s = student.reshape(n, anchors, 5 + classes, h, w)
    t = teacher.reshape(n, anchors, 5 + classes, h, w)
    p = torch.sigmoid(t[:, :, 4])
    obj = F.binary_cross_entropy_with_logits(s[:, :, 4], p) - F.binary_cross_entropy_with_logits(t[:, :, 4], p)
    weight = p / p.sum().clamp_min(1e-6)  # N A H W, sums to 1
    scale = spread(t[:, :, :4].transpose(1, 2).reshape(n, 4, -1))  # per box coordinate
    box = F.smooth_l1_loss(
        s[:, :, :4] / scale.reshape(1, 1, 4, 1, 1), t[:, :, :4] / scale.reshape(1, 1, 4, 1, 1), reduction="none"
    ).sum(2)
    tt = float(temperature)
    ls, lt = F.log_softmax(s[:, :, 5:] / tt, dim=2), F.log_softmax(t[:, :, 5:] / tt, dim=2)
    cls = (lt.exp() * (lt - ls)).sum(2) * (tt * tt)
    return obj + (weight * (box + cls)).sum()


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher) along the feature axis (the channel axis of an N x C x H x W map, else the last),
    averaged over everything else."""
    axis = 1 if student.dim() == 4 else -1
    return (1 - F.cosine_similarity(student, teacher, dim=axis, eps=1e-8)).mean()


def feature(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference relative to the teacher's mean square (scale-free across layers)."""
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def _heads(model) -> dict[str, dict]:
    """The YOLO heads the ``carve.detection`` metadata describes: output -> {anchors: A, classes: C}."""
    text = model.metadata().get("carve.detection")
    try:
        meta = json.loads(text) if text else {}
        return {h: {"anchors": len(v["anchors"]), "classes": int(meta["classes"])} for h, v in meta["heads"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}


def _declared(model) -> dict[str, str]:
    """The ``carve.outputs`` metadata (``{"output": "logits" | "regression" | "dense" | "embedding"}``)."""
    text = model.metadata().get("carve.outputs")
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return {k: v for k, v in d.items() if v in KIND_LOSS} if isinstance(d, dict) else {}


def _is_norm(model, name: str) -> bool:
    """Whether ``name`` is computed as a vector norm (ReduceL2, or Sqrt of a ReduceSum / ReduceSumSquare, possibly
    clipped or expanded)."""
    node = model.producer.get(name)
    for _ in range(4):
        if node is None:
            return False
        if node.op_type in ("ReduceL2",):
            return True
        if node.op_type == "Sqrt":
            inner = model.producer.get(node.input[0])
            return inner is not None and inner.op_type in ("ReduceSum", "ReduceSumSquare", "ReduceMean")
        if node.op_type not in ("Clip", "Max", "Expand", "Add"):
            return False
        node = model.producer.get(node.input[0])
    return False
