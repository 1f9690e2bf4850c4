"""Distillation fine-tuning of an ONNX graph's own weights.

The student graph runs in PyTorch (:class:`~carve.pipeline.runtime.torch_graph.TorchGraph`): its float initializers are
parameters, BatchNormalization nodes train as batch norm (batch statistics; running statistics updated with the node's
momentum), and a graph whose BN was folded trains its folded convs. Non-float initializers (shapes, axes) and the
parameters of nodes matched by ``freeze`` stay untouched. After training the values are written back into a copy of
the very same graph (no re-export), which must pass the checker, keep its output shapes, hold only finite weights and
agree with the trained torch module in ONNX Runtime; the fine-tune is recorded in its ``carve.history``. A graph
with no BatchNormalization to train (an eval-mode export folds it into the convs) gets one per conv for the training
only, folded back at the end (:mod:`carve.pipeline.training.bn_insert`; option ``bn``).

Loss (:mod:`carve.pipeline.training.losses`, :mod:`carve.pipeline.training.schedule`): distillation from a teacher
graph, every output with the loss chosen for what it is (class logits: KL at temperature T, SFP's variable temperature
as ``START:END``; boxes, dense maps, embeddings, YOLO heads: their own), cross-entropy when the data has labels, and a
feature loss on tensors that exist with the same shape in both graphs. The teacher runs in ONNX Runtime on the CPU
(cheaper than torch there) and in PyTorch on CUDA. Training: SGD with Nesterov momentum or AdamW, cosine learning rate
with optional linear warm-up, weight decay on weight tensors only, gradient clipping, random-crop-and-flip augmentation
(:mod:`carve.pipeline.training.augment`). The data order and augmentation of epoch e come from a generator seeded with
(seed, e), so a seeded run on the CPU is repeatable, and a run resumed from an epoch checkpoint continues exactly as the
uninterrupted one would.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from carve.pipeline.data.datasets import Dataset
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.channels import fingerprint
from carve.pipeline.graph.history import record
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.shapes import verify_structure
from carve.pipeline.progress import Progress
from carve.pipeline.training import bn_insert, losses
from carve.pipeline.training.augment import Augment
from carve.pipeline.training.schedule import Temperature, cosine_lr

CHECKPOINT_VERSION = 2  # 2: keyed by the weights' content and the teacher (issue 21)


# Per-optimiser defaults, chosen on ResNet-56 pruned to 0.5 of its MACs (L1, no repair: 15.2% top-1), 3 epochs of the
# 10k CIFAR train subset, distillation from the original (docs/finetune.md has the table): AdamW 1e-3 / 0.02 with CE 1
# reached 83.8% top-1 on the 10k test images; AdamW 2e-3: 82.5%, 5e-4: 82.2%; SGD 5e-3: 82.5%, SGD 5e-2: 77.4%.
DEFAULTS: dict[str, dict[str, float]] = {
    "adamw": {"lr": 1e-3, "weight_decay": 0.02},
    "sgd": {"lr": 5e-3, "weight_decay": 5e-4},
}


@dataclass
class FinetuneOptions:
    epochs: float = 3.0  # passes over the training data (ignored when steps is set)
    steps: int | None = None  # optimiser steps in all
    batch: int = 64
    lr: float | None = None  # peak learning rate (default: the optimiser's, DEFAULTS)
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float | None = None  # on weight tensors only, not biases or BN parameters (default: DEFAULTS)
    warmup: float = 0.0  # linear warm-up, as a fraction of all steps
    temperature: str = "4"  # distillation temperature T, or START:END (SFP's variable temperature)
    kd: float = 1.0  # weight of the distillation loss (when there is a teacher)
    ce: float | None = None  # weight of the cross-entropy (default: 1 when the data has labels, else 0)
    features: list[str] = field(default_factory=list)  # tensors matched between student and teacher
    output_losses: dict[str, str] = field(default_factory=dict)  # output name -> loss (losses.LOSSES); else chosen
    feature_weight: float = 1.0
    clip: float = 5.0  # gradient norm clipping (0: off)
    crop_pad: int = 4  # random-crop padding in pixels (0: no crop)
    flip: bool = True  # random horizontal flip
    freeze: list[str] = field(default_factory=list)  # glob patterns of node names whose parameters stay as they are
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads (default: torch's)
    bn: str = "auto"  # auto | insert | keep | off: BatchNormalization for training (bn_insert)
    bn_init: str = "teacher"  # inserted BNs' affine: the teacher's channel statistics | identity (bn_insert.matched)

    def __post_init__(self) -> None:
        if self.optimizer not in DEFAULTS:
            raise CarveError(f"`optimizer` must be adamw or sgd, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULTS[self.optimizer]["lr"]
        if self.weight_decay is None:
            self.weight_decay = DEFAULTS[self.optimizer]["weight_decay"]

    def check(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise CarveError(f"`device` must be auto, cpu or cuda, got {self.device!r}")
        for name, value in (("lr", self.lr), ("batch", self.batch), ("epochs", self.epochs)):
            if not value > 0 or not math.isfinite(value):
                raise CarveError(f"`{name}` must be a positive number, got {value}")
        if self.steps is not None and self.steps < 0:
            raise CarveError(f"`steps` must be at least 0, got {self.steps}")
        nonneg = [("weight_decay", self.weight_decay), ("warmup", self.warmup), ("clip", self.clip)]
        nonneg += [("kd", self.kd), ("feature_weight", self.feature_weight), ("crop_pad", self.crop_pad)]
        nonneg += [("momentum", self.momentum)] + ([("ce", self.ce)] if self.ce is not None else [])
        for name, value in nonneg:
            if not value >= 0 or not math.isfinite(value):
                raise CarveError(f"`{name}` must be a number >= 0, got {value}")
        Temperature.parse(self.temperature)
        bn_insert.check_mode(self.bn)
        if self.bn_init not in ("teacher", "identity"):
            raise CarveError(f"`bn_init` must be teacher or identity, got {self.bn_init!r}")
        losses.check_overrides(self.output_losses)


@dataclass
class FinetuneResult:
    model: Model
    summary: dict[str, Any]


def data_fingerprint(data: Dataset) -> str:
    """A digest of exactly what is trained on: the source, the sample, the pixels, the labels and the preprocessing."""
    h = hashlib.sha256()
    idx = data._idx()
    h.update(repr((data.name, data.preprocess.to_dict(), len(idx))).encode())
    h.update(np.ascontiguousarray(idx).tobytes())
    for start in range(0, len(idx), 1024):
        h.update(np.ascontiguousarray(data.images[idx[start : start + 1024]]).tobytes())
    if data.labels is not None:
        h.update(np.ascontiguousarray(data.labels[idx]).tobytes())
    return h.hexdigest()[:16]


def finetune(
    student: Model,
    data: Dataset,
    opts: FinetuneOptions | None = None,
    *,
    teacher: Model | None = None,
    eval_data: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` on ``data`` (distilling from ``teacher`` when given); returns a new model and a summary.

    ``checkpoint``: a file written (atomically) at the end of every epoch; with ``resume`` the run continues from it.
    ``progress`` (:class:`carve.pipeline.progress.Progress`) hears ``train: step`` and ``train: epoch``.
    """
    import torch

    from carve.pipeline.runtime.torch_graph import TorchGraph

    opts = opts or FinetuneOptions()
    opts.check()
    if data.labels is None and teacher is None:
        raise CarveError(
            f"{data.name}: has no labels and no teacher was given: nothing to learn from",
            hint="give a teacher (the original model: distillation needs no labels) or labelled data",
        )
    _check_input_weights(student, "the model")
    if teacher is not None:
        _same_batch(student, teacher)
        _check_input_weights(teacher, "the teacher")
        from carve.pipeline.runtime.ort import check_runs

        check_runs(teacher, what="the teacher")  # it runs in ONNX Runtime: a refusal is the file's, named
    if eval_data is not None and eval_data.labels is None:
        from carve.pipeline.errors import warn

        warn(f"{eval_data.name}: has no labels, so top-1 cannot be measured on it; it is not evaluated per epoch")
        eval_data = None
    device = _device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    schedule = Schedule.of(opts, len(data))
    # no step, nothing to train: the student as it is (the written bytes stay the same)
    graph, inserted = _training_graph(student, data, opts, teacher) if schedule.total else (student, [])
    net = TorchGraph(graph).to(device)
    frozen = _freeze(net, graph, opts.freeze)
    if schedule.total and not any(p.requires_grad for p in net.params.values()):
        raise CarveError(
            f"`freeze` {' '.join(opts.freeze)} freezes every trained weight: nothing is left to train",
            hint="freeze fewer nodes (`carve inspect` lists the node names)",
        )
    loss = Loss.compose(opts, student, teacher, data, _check_data(student, data, net, device), device)
    optim, params = optimizer(net, opts)
    key = run_key(student, data, opts, teacher)
    state = _load_checkpoint(checkpoint, key, net, optim, device) if resume else TrainState()
    if eval_data is not None and eval_data.labels is None:
        eval_data = None  # per-epoch top-1 needs labels (the flow still reports agreement with the teacher at the end)
    teacher_top1 = _top1_teacher(loss.teacher, eval_data) if eval_data is not None and loss.teacher else None
    meter = Meter(progress, schedule)
    net.train()
    net.batch_statistics = opts.bn != "off"
    for epoch in range(state.epoch, schedule.epochs):
        entry = train_epoch(net, optim, params, loss, data, opts, schedule, state, epoch, meter)
        if eval_data is not None:
            entry["top1"] = _top1_student(net, eval_data, device)
            if teacher_top1 is not None:
                entry["teacher_top1"] = teacher_top1
        state.history.append(entry)
        state.epoch = epoch + 1
        if checkpoint is not None:
            _save_checkpoint(checkpoint, key, net, optim, state)
        meter.epoch(entry)
    net.batch_statistics = False
    net.eval()
    result, agreement = write_back(net, student, frozen, data, device, graph, inserted)
    summary = summarise(opts, state, meter, loss, device, data, key, teacher, frozen, agreement)
    summary["bn"] = bn_insert.describe(opts.bn, inserted, student)
    record(result, "finetune", summary, command=command)
    return FinetuneResult(result, summary)


# ---------------------------------------------------------------------------------------------------------------------
# the run's parts: schedule, optimiser, loss, state, the loop, progress, write-back, summary


@dataclass(frozen=True)
class Schedule:
    """How many steps the run makes: ``batch`` images a step, ``per_epoch`` steps an epoch (the last partial batch
    is dropped: BN needs real batches), ``total`` in all over ``epochs`` epochs, ``warm`` of them warming up."""

    batch: int
    per_epoch: int
    total: int
    epochs: int
    warm: int

    @classmethod
    def of(cls, opts: FinetuneOptions, n: int) -> Schedule:
        batch = min(opts.batch, n)
        per_epoch = max(1, n // batch)
        total = opts.steps if opts.steps is not None else int(round(opts.epochs * per_epoch))
        epochs = math.ceil(total / per_epoch) if total else 0
        return cls(batch, per_epoch, total, epochs, int(opts.warmup * total))


def optimizer(net, opts: FinetuneOptions):
    """The optimiser over the trainable parameters (weight decay on weight tensors only) and those parameters."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": opts.weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.momentum > 0), params
    return torch.optim.AdamW(groups, lr=opts.lr), params


@dataclass
class Loss:
    """The training loss: distillation from the teacher at temperature T (with feature matching), plus
    cross-entropy on the labels; each part weighted as the options say."""

    teacher: _Teacher | None
    temperature: Temperature
    kd: float
    ce: float
    features: list[str]
    feature_weight: float
    device: str
    outputs: list[losses.OutputLoss] = field(default_factory=list)  # the distillation loss of every output

    @classmethod
    def compose(
        cls,
        opts: FinetuneOptions,
        student: Model,
        teacher: Model | None,
        data: Dataset,
        out_shape: tuple[int, ...],
        device: str,
    ) -> Loss:
        """The loss these options, models and data call for, checked before any training."""
        ce = opts.ce
        if ce is None:  # labels: cross-entropy (beside distillation with a teacher); none: distillation only
            ce = 0.0 if data.labels is None else 1.0
        if ce and data.labels is None:
            raise CarveError(f"`ce` {ce}: {data.name} has no labels")
        if ce:
            _check_labels(data, out_shape)
        if opts.features:
            _check_features(student, teacher, opts.features)
        run = _Teacher(teacher, device, opts.threads) if teacher is not None else None
        temperature = Temperature.parse(opts.temperature)
        plan = losses.output_losses(student, teacher, opts.output_losses) if teacher is not None else []
        return cls(run, temperature, opts.kd, ce, list(opts.features), opts.feature_weight, device, plan)

    def __call__(self, net, x_np: np.ndarray, y_np, t: float):
        """(loss, its parts) of one batch at temperature ``t``."""
        import torch

        x = torch.from_numpy(x_np).to(self.device)
        out, feats = net(x, capture=self.features) if self.features else (net(x), {})
        outs = list(out) if isinstance(out, tuple) else [out]
        logits = outs[0]
        loss = torch.zeros((), device=self.device)
        parts = {}
        if self.teacher is not None:
            t_outs, t_feats = self.teacher(x_np, self.features, [o.output for o in self.outputs])
            terms = [
                losses.distil(o.loss, s, t_out.to(self.device), t, **o.params)
                for o, s, t_out in zip(self.outputs, outs, t_outs)
                if o.loss != "none"
            ]
            parts["kd"] = sum(terms) / len(terms)  # the mean over the distilled outputs
            loss = loss + self.kd * parts["kd"]
            if self.features:
                pairs = [(feats[n], t_feats[n].to(self.device)) for n in self.features]
                parts["feature"] = sum(losses.feature(a, b) for a, b in pairs) / len(pairs)
                loss = loss + self.feature_weight * parts["feature"]
        if self.ce:
            y = torch.from_numpy(y_np).to(self.device)
            parts["ce"] = torch.nn.functional.cross_entropy(logits.reshape(len(x), -1), y)
            loss = loss + self.ce * parts["ce"]
        return loss, parts


@dataclass
class TrainState:
    """Where a run is: epochs and steps done, one history entry per epoch (what a checkpoint holds)."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


def model_digest(model: Model) -> str:
    """A digest of a model's content: its graph (nodes, initializer names and shapes) and every weight's bytes."""
    h = hashlib.sha256(repr(fingerprint(model)).encode())
    for t in model.graph.initializer:
        arr = model.array(t.name)
        h.update(f"{t.name}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def run_key(student: Model, data: Dataset, opts: FinetuneOptions, teacher: Model | None = None) -> dict[str, Any]:
    """What a checkpoint must have been made for to continue this run: the model and the teacher (by content), the
    data and every option that changes the result."""
    return {
        "model": model_digest(student),
        "teacher": None if teacher is None else model_digest(teacher),
        "data": data_fingerprint(data),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("threads", "device")},
    }


def train_epoch(
    net,
    optim,
    params,
    loss: Loss,
    data: Dataset,
    opts: FinetuneOptions,
    schedule: Schedule,
    state: TrainState,
    epoch: int,
    meter: Meter,
) -> dict[str, Any]:
    """One epoch of optimiser steps (the order and augmentation seeded with (seed, epoch)); its history entry."""
    import torch

    rng = np.random.default_rng([opts.seed, epoch])
    order = rng.permutation(len(data))
    augment = Augment(opts.crop_pad, opts.flip)
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "feature": 0.0}
    batches = 0
    for b in range(schedule.per_epoch):
        if state.step >= schedule.total:
            break
        x_np, y_np = data.take(order[b * schedule.batch : (b + 1) * schedule.batch])
        x_np = augment(x_np, rng)
        lr = cosine_lr(state.step, schedule.total, opts.lr, schedule.warm)
        for g in optim.param_groups:
            g["lr"] = lr
        t = loss.temperature.at(state.step / max(1, schedule.total))
        value, parts = loss(net, x_np, y_np, t)
        if not torch.isfinite(value):
            raise CarveError(
                f"fine-tuning diverged at step {state.step + 1} (loss {float(value)})",
                hint="lower `lr` or raise `clip`",
            )
        optim.zero_grad(set_to_none=True)
        value.backward()
        if opts.clip:
            torch.nn.utils.clip_grad_norm_(params, opts.clip)
        optim.step()
        state.step += 1
        batches += 1
        sums["loss"] += float(value.detach())
        for k, v in parts.items():
            sums[k] += float(v.detach())
        meter.step(state.step, epoch, len(x_np), loss=float(value.detach()), lr=lr, temperature=t)
    return {"epoch": epoch + 1, "steps": state.step, **{k: v / max(batches, 1) for k, v in sums.items() if v}}


class Meter:
    """Counts images and time, and tells ``progress`` about every step and epoch."""

    def __init__(self, progress: Progress | None, schedule: Schedule) -> None:
        self.progress, self.schedule = progress, schedule
        self.images = 0
        self.started, self.cpu0 = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the start."""
        return time.perf_counter() - self.started, time.process_time() - self.cpu0

    def step(self, step: int, epoch: int, images: int, **figures: float) -> None:
        self.images += images
        if not self.progress:
            return
        s = self.schedule
        wall = time.perf_counter() - self.started
        rate = self.images / wall if wall > 0 else 0.0
        eta = (s.total - step) * s.batch / rate if rate else None
        info = {"epoch": epoch + 1, "epochs": s.epochs, **figures, "images_per_s": rate, "eta_s": eta}
        self.progress("train: step", step, s.total, **info)

    def epoch(self, entry: dict[str, Any]) -> None:
        if self.progress:
            figures = {k: v for k, v in entry.items() if k not in ("epoch", "steps")}
            self.progress("train: epoch", entry["epoch"], self.schedule.epochs, **figures)


def _training_graph(
    student: Model, data: Dataset, opts: FinetuneOptions, teacher: Model | None
) -> tuple[Model, list[bn_insert.Inserted]]:
    """The graph that trains: the student, or (``bn`` auto on a graph without BatchNormalization, or insert) the
    student with a BatchNormalization after each conv and hidden Gemm that has none (frozen ones excepted), calibrated
    on up to 256 training images; and the inserted BNs."""
    if not bn_insert.decide(opts.bn, student):
        return student, []
    skip = {n.name for n in student.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in opts.freeze)}
    calib = data.sample(min(256, len(data)), seed=opts.seed)
    return bn_insert.insert(student, calib, skip=skip, teacher=teacher if opts.bn_init == "teacher" else None)


def write_back(
    net,
    student: Model,
    frozen: set[str],
    data: Dataset,
    device: str,
    graph: Model | None = None,
    inserted: list[bn_insert.Inserted] | None = None,
) -> tuple[Model, dict[str, float]]:
    """The trained values written into a copy of the student graph (``graph``, the graph that trained when BNs were
    ``inserted``, with them folded back into their convs), checked (checker and output shapes, finite weights, ONNX
    Runtime against the torch module); the copy and the agreement."""
    import torch

    result = (graph or student).copy()
    with torch.no_grad():
        net.write_back(result, only=[n for n in net.param_of if n not in frozen])
    if inserted:
        result = bn_insert.fold_back(result, student, inserted)
    verify_structure({n: student.shape(n) for n in student.output_names}, result, what="fine-tuning")
    _check_finite(result)
    return result, _agreement(net, result, data, device)


def summarise(
    opts: FinetuneOptions,
    state: TrainState,
    meter: Meter,
    loss: Loss,
    device: str,
    data: Dataset,
    key: dict[str, Any],
    teacher: Model | None,
    frozen: set[str],
    agreement: dict[str, float],
) -> dict[str, Any]:
    """The run's summary (returned, and recorded in the model's history)."""
    seconds, cpu = meter.elapsed()
    if teacher is None:
        source = None
    else:
        source = str(teacher.source) if teacher.source else "given"
    return {
        "steps": state.step,
        "epochs": state.history[-1]["epoch"] if state.history else 0,
        "images": meter.images,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "images_per_s": round(meter.images / seconds, 1) if seconds > 0 else None,
        "device": device,
        "data": {**data.describe(), "fingerprint": key["data"]},
        "teacher": source,
        "losses": {
            "kd": opts.kd if teacher is not None else 0.0,
            "ce": loss.ce,
            "features": opts.features,
            "outputs": {o.output: {"loss": o.loss, "kind": o.kind, "why": o.why} for o in loss.outputs},
        },
        "options": asdict(opts),
        "history": state.history,
        "resumed_from_epoch": state.resumed_from,
        "frozen_parameters": len(frozen),
        "torch_vs_ort": agreement,
    }


# ---------------------------------------------------------------------------------------------------------------------
# pieces


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise CarveError("`device=cuda`: torch sees no CUDA GPU", hint="use `device=cpu` (or auto)")
    return choice


def _freeze(net, model: Model, patterns: list[str]) -> set[str]:
    """Stop gradients for the parameters of nodes matching ``patterns``; returns their initializer names."""
    if not patterns:
        return set()
    nodes = [n for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in patterns)]
    if not nodes:
        raise CarveError(f"`freeze` {' '.join(patterns)} matches no node", hint="`carve inspect` lists the node names")
    names = {i for n in nodes for i in n.input if i in net.param_of}
    for name in names:
        net.parameter(name).requires_grad_(False)
    return names


def _check_data(model: Model, data: Dataset, net, device: str) -> tuple[int, ...]:
    """The first batch must fit the model's input; returns the output shape of one sample."""
    import torch

    if len(data) == 0:
        raise CarveError(f"{data.name}: holds no images")
    x, _ = data.take(np.arange(min(2, len(data))))
    want = model.shape(model.input_names[0])
    fits = want is None or (len(want) == x.ndim and all(w is None or w == d for w, d in zip(want[1:], x.shape[1:])))
    if not fits:
        raise CarveError(
            f"{data.name}: images become {list(x.shape[1:])} after preprocessing, the model takes {list(want[1:])}",
            hint="check the data's image size and channel count (or the model's carve.preprocess metadata)",
        )
    with torch.no_grad():
        net.eval()
        out = net(torch.from_numpy(x).to(device))
    out = out[0] if isinstance(out, tuple) else out
    return tuple(out.shape[1:])


def _check_labels(data: Dataset, out_shape: tuple[int, ...]) -> None:
    classes = int(np.prod(out_shape))
    labels = data.labels[data._idx()]
    if labels.min() < 0 or labels.max() >= classes:
        raise CarveError(
            f"{data.name}: labels range {int(labels.min())}..{int(labels.max())}, the model has {classes} outputs",
            hint="labels must be class indices 0..classes-1",
        )


def _check_features(student: Model, teacher: Model | None, names: list[str]) -> None:
    if teacher is None:
        raise CarveError("`features` needs a `teacher` to match the tensors against")
    for n in names:
        s, t = student.shape(n), teacher.shape(n)
        if n not in student.producer or n not in teacher.producer:
            missing = "student" if n not in student.producer else "teacher"
            raise CarveError(f"`features` {n}: no tensor of that name in the {missing} graph")
        if s is None or t is None or s[1:] != t[1:]:
            raise CarveError(
                f"`features` {n}: shapes differ between student {s} and teacher {t}",
                hint="match tensors whose channels were not pruned (e.g. a residual stream left at full width)",
            )


class _Teacher:
    """The teacher graph: ONNX Runtime on the CPU, PyTorch on CUDA; returns logits (and captured tensors)."""

    def __init__(self, model: Model, device: str, threads: int | None) -> None:
        self.model, self.device = model, device
        self.sessions: dict[tuple[str, ...], Any] = {}
        self.threads = threads or 1
        if device != "cpu":
            from carve.pipeline.runtime.torch_graph import TorchGraph

            self.net = TorchGraph(model, trainable=False).eval().to(device)

    def __call__(self, x: np.ndarray, features: list[str], outputs: list[str] | None = None):
        """The teacher's ``outputs`` (a list; its first output alone when None) and captured ``features``."""
        import torch

        names = list(outputs) if outputs else [self.model.output_names[0]]
        if self.device != "cpu":
            with torch.no_grad():
                xt = torch.from_numpy(x).to(self.device)
                out, feats = self.net(xt, capture=features) if features else (self.net(xt), {})
            out = dict(zip(self.model.output_names, out if isinstance(out, tuple) else (out,)))
            got = [out[n] for n in names]
            return (got if outputs else got[0]), feats
        sess = self.sessions.get(tuple(features))
        if sess is None:
            from carve.pipeline.data.capture import with_outputs
            from carve.pipeline.runtime.ort import session

            proto = with_outputs(self.model, list(features)) if features else self.model.proto
            sess = self.sessions[tuple(features)] = session(proto, threads=self.threads)
        outs = sess.run([*names, *features], {self.model.input_names[0]: x})
        got = [torch.from_numpy(v) for v in outs[: len(names)]]
        feats = {n: torch.from_numpy(v) for n, v in zip(features, outs[len(names) :])}
        return (got if outputs else got[0]), feats


def _top1_student(net, data: Dataset, device: str) -> float:
    import torch

    was_training, statistics = net.training, net.batch_statistics
    net.eval()
    net.batch_statistics = False
    correct, total = 0, 0
    with torch.no_grad():
        for x, y in data.batches(256):
            out = net(torch.from_numpy(x).to(device))
            out = out[0] if isinstance(out, tuple) else out
            correct += int((out.reshape(len(x), -1).argmax(1).cpu().numpy() == y).sum())
            total += len(x)
    net.train(was_training)
    net.batch_statistics = statistics
    return correct / max(total, 1)


def _top1_teacher(teacher: _Teacher, data: Dataset) -> float:
    correct, total = 0, 0
    for x, y in data.batches(256):
        out, _ = teacher(x, [])
        correct += int((out.reshape(len(x), -1).argmax(1).cpu().numpy() == y).sum())
        total += len(x)
    return correct / max(total, 1)


def _same_batch(student: Model, teacher: Model) -> None:
    """The teacher runs on the student's batches: a static batch it declares must be the student's."""

    def batch(m: Model):
        dims = m.proto.graph.input[0].type.tensor_type.shape.dim if len(m.proto.graph.input) else []
        return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else None

    t, s = batch(teacher), batch(student)
    if t is not None and t != s:
        raise CarveError(
            f"{teacher.source or 'the teacher'}: declares a static batch of {t}, but the student "
            f"{'takes any batch' if s is None else f'has batch {s}'}; the teacher runs on the student's batches",
            hint="export the teacher with a dynamic batch (or the student's)",
        )


def _check_input_weights(model: Model, what: str) -> None:
    """NaN or Inf in a weight given to train is the input's fault, named as such (not "diverged" a step later)."""
    for t in model.graph.initializer:
        arr = model.array(t.name)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise CarveError(
                f"{model.source or what}: weight {t.name!r} of {what} holds {bad} NaN/Inf value(s) before training",
                hint="the file is damaged, or was written by a training run that blew up; export it again",
            )


def _check_finite(model: Model) -> None:
    for t in model.graph.initializer:
        arr = model.array(t.name)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CarveError(f"fine-tuning produced non-finite values in {t.name!r}", hint="lower `lr` or raise `clip`")


def _agreement(net, model: Model, data: Dataset, device: str) -> dict[str, float]:
    """The written graph in ONNX Runtime against the trained torch module, on a few training images."""
    import torch

    from carve.pipeline.data.batching import first_batch
    from carve.pipeline.runtime.ort import run
    from carve.pipeline.runtime.verify import output_metrics

    x = first_batch(model, data, 8)  # exactly the model's batch when it is static
    with torch.no_grad():
        ref = net(torch.from_numpy(x).to(device))
    ref = (ref[0] if isinstance(ref, tuple) else ref).float().cpu().numpy()
    got = run(model, {model.input_names[0]: x})[0]
    m = output_metrics(ref, got)
    if not m["max_rel"] <= 1e-3:
        raise CarveError(
            f"the fine-tuned graph disagrees with the trained module in ONNX Runtime (max relative {m['max_rel']:.3g})",
            hint="please report this model: an op the PyTorch runner and ONNX Runtime compute differently",
        )
    return {"max_abs": m["max_abs"], "max_rel": m["max_rel"]}


def _save_checkpoint(path, key: dict, net, optim, state: TrainState) -> None:
    import torch

    from carve.pipeline.files import atomic_write

    with atomic_write(path, "wb") as f:  # staged, fsynced, renamed: a kill leaves the old checkpoint or the new
        torch.save(
            {
                "version": CHECKPOINT_VERSION,
                "key": key,
                "epoch": state.epoch,
                "step": state.step,
                "history": state.history,
                "params": {k: v.detach().cpu() for k, v in net.params.items()},
                "optimizer": optim.state_dict(),
            },
            f,
        )


def _load_checkpoint(path, key: dict, net, optim, device: str) -> TrainState:
    import torch

    if path is None or not Path(path).is_file():
        raise CarveError(f"`resume`: no checkpoint at {path}", hint="run without `resume` to start from the beginning")
    try:
        # data only: a checkpoint is user-supplied bytes, and a pickle can run code as it loads (issue 21)
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CarveError(
            f"{path}: not a readable carve checkpoint ({type(exc).__name__}); carve reads checkpoints as data only",
            hint="a checkpoint that holds code (pickled objects) is refused; start without `resume`",
        ) from None
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or not isinstance(ck.get("key"), dict):
        raise CarveError(f"{path}: not a carve fine-tuning checkpoint (or from another carve version)")
    for what in ("model", "data", "options", "teacher"):
        if ck["key"].get(what) != key[what]:
            raise CarveError(
                f"{path}: the checkpoint was made for another {what}; it cannot continue this run",
                hint="delete it, or give the same model, teacher, data and options as the interrupted run",
            )
    _check_checkpoint(path, ck, net)
    with torch.no_grad():
        for k, v in ck["params"].items():
            net.params[k].copy_(v.to(device))
    try:
        optim.load_state_dict(ck["optimizer"])
    except Exception as exc:
        raise CarveError(f"{path}: the optimizer state does not fit this run ({type(exc).__name__})") from None
    return TrainState(ck["epoch"], ck["step"], list(ck["history"]), resumed_from=ck["epoch"])


def _check_checkpoint(path, ck: dict, net) -> None:
    """The checkpoint's schema: counters, history, and exactly the trained tensors by name, shape and dtype (a tensor
    of another shape would broadcast into the weight instead of failing)."""
    import torch

    for k in ("epoch", "step"):
        v = ck.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise CarveError(f"{path}: `{k}` is {v!r}, not a count")
    if not isinstance(ck.get("history"), list) or not isinstance(ck.get("optimizer"), dict):
        raise CarveError(f"{path}: `history` or `optimizer` is missing or malformed")
    params = ck.get("params")
    if not isinstance(params, dict) or set(params) != set(net.params):
        names = sorted(set(params) ^ set(net.params)) if isinstance(params, dict) else []
        raise CarveError(f"{path}: the checkpoint's tensors are not this model's ({names[:3] or 'no tensors'})")
    for name, v in params.items():
        own = net.params[name]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own.shape) or v.dtype != own.dtype:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise CarveError(f"{path}: tensor {name!r} is {got}, the model's is {tuple(own.shape)} {own.dtype}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CarveError(f"{path}: tensor {name!r} holds NaN or Inf")
