"""``carve finetune`` as a flow: the student (and teacher) files, the training and evaluation data in; the fine-tuned
model written atomically (never over an input), epoch checkpoints next to it so an interrupted run resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carve.pipeline.data.datasets import Preprocess, load_data
from carve.pipeline.data.shared import data_input
from carve.pipeline.graph.io import check_output_path, load, save
from carve.pipeline.measure.evaluate import evaluate, same_input
from carve.pipeline.progress import Progress
from carve.pipeline.training.finetune import FinetuneOptions, FinetuneResult, finetune


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
    """Fine-tune the model at ``student_path`` and save it to ``output``; returns the result and, with ``eval_data``,
    the final accuracy of student and teacher in ONNX Runtime."""
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
    evalset = (
        load_data(eval_data, model=student, preprocess=pre, samples=eval_samples, seed=opts.seed + 1)
        if eval_data
        else None
    )
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
        accuracy = {"final": evaluate(result.model, evalset, reference=teacher)}
        if teacher is not None:
            accuracy["teacher"] = evaluate(teacher, evalset)
    return result, accuracy
