"""``carve finetune`` as a flow: the student (and teacher) files, the training and evaluation data in; the fine-tuned
model written atomically (never over an input), epoch checkpoints next to it so an interrupted run resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.data.shared import data_input
from carve.pipeline.graph.io import check_output_path, load, save
from carve.pipeline.measure.evaluate import evaluate, same_input
from carve.pipeline.progress import Progress
from carve.pipeline.training.finetune import FinetuneOptions, FinetuneResult, finetune

HELD_BACK = 1000  # images kept out of training for the agreement check when no evaluation data is given


def checkpoint_path(output: str | Path) -> Path:
    """Where ``carve finetune -o OUT`` keeps its epoch checkpoint: ``OUT.ckpt`` beside the output."""
    out = Path(output)
    return out.with_name(out.name + ".ckpt")


def finetune_file(
    student_path: str | Path,
    output: str | Path,
    data: str,
    opts: FinetuneOptions,
    *,
    teacher_path: str | Path | None = None,
    samples: int | None = None,
    eval_data: str | None = None,
    eval_samples: int | None = None,
    preprocess: Preprocess | None = None,
    resume: bool = False,
    keep_checkpoint: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
) -> tuple[FinetuneResult, dict[str, Any] | None]:
    """Fine-tune the model at ``student_path`` and save it to ``output``; returns the result and the final accuracy of
    student and teacher in ONNX Runtime on ``eval_data``, or without it the student's agreement with the teacher (the
    starting model when there is none) on images of ``data`` held back from training (:func:`hold_back`)."""
    # every file the command reads is an input: the student, the teacher, the training and the evaluation data
    inputs = [student_path, teacher_path, data_input(data), data_input(eval_data)]
    check_output_path(output, *inputs)
    ckpt = checkpoint_path(output)
    check_output_path(ckpt, *inputs)
    student = load(student_path)
    teacher = load(teacher_path) if teacher_path else None
    if teacher is not None:
        same_input(student, teacher, purpose="distillation")  # distillation compares outputs on the same images
    pre = preprocess or Preprocess.for_model(student)
    train = load_data(data, model=student, preprocess=pre, samples=samples, seed=opts.seed)
    held = None
    if eval_data:
        evalset = load_data(eval_data, model=student, preprocess=pre, samples=eval_samples, seed=opts.seed + 1)
    else:  # without --eval: agreement with the teacher on images of the training data not trained on
        train, held = hold_back(train, seed=opts.seed + 1)
        evalset = None
    result = finetune(
        student,
        train,
        opts,
        teacher=teacher,
        eval_data=evalset,
        checkpoint=ckpt,
        resume=resume,
        progress=progress,
        command=command,
    )
    save(result.model, output, check_inputs=[student_path, teacher_path])
    if not keep_checkpoint:
        ckpt.unlink(missing_ok=True)
    accuracy = None
    if evalset is not None:
        accuracy = {"final": evaluate(result.model, evalset, reference=teacher), "data": str(eval_data)}
        if teacher is not None:
            accuracy["teacher"] = evaluate(teacher, evalset)
    elif held is not None:
        reference = teacher if teacher is not None else load(student_path)  # the model fine-tuning started from
        accuracy = {
            "final": evaluate(result.model, held, reference=reference),
            "data": str(data),
            "held_back": len(held),
        }
    return result, accuracy


def hold_back(train: Dataset, *, limit: int = HELD_BACK, seed: int = 0) -> tuple[Dataset, Dataset | None]:
    """Images to check the result on when no evaluation data is given: up to ``limit`` of the data's images that the
    sample left out, else a tenth of the sample (at most ``limit``) taken out of training. None when the data is too
    small to spare any (under 20 images)."""
    idx = np.arange(len(train.images)) if train.indices is None else train.indices
    rest = np.setdiff1d(np.arange(len(train.images)), idx)
    if len(rest):
        pick = np.sort(np.random.default_rng(seed).permutation(rest)[:limit])
        return train, Dataset(train.images, train.labels, train.name, train.preprocess, pick)
    if len(idx) < 20:
        return train, None
    n = min(len(idx) // 10, limit)
    order = np.random.default_rng(seed).permutation(len(idx))
    keep, held = np.sort(idx[order[n:]]), np.sort(idx[order[:n]])
    return (
        Dataset(train.images, train.labels, train.name, train.preprocess, keep),
        Dataset(train.images, train.labels, train.name, train.preprocess, held),
    )
