"""``carve finetune STUDENT.onnx --teacher ORIGINAL.onnx --data TRAIN -o OUT.onnx``: train the graph's own weights back
(distillation from the teacher, cross-entropy when the data has labels), with progress, per-epoch evaluation and
checkpoints that let an interrupted run resume."""

from __future__ import annotations

import argparse
import sys

from carve.pipeline.cli._common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="distillation fine-tuning of a (pruned) model's own weights", description=__doc__
    )
    p.add_argument("model", help="the ONNX model to train (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the fine-tuned model")
    p.add_argument("--teacher", help="the model to distil from (usually the unpruned original)")
    p.add_argument(
        "--data", required=True, help="training data: an .npz/.npy, a folder of class sub-folders, or digits"
    )
    p.add_argument("--samples", type=positive_int, help="train on this many samples of --data (seeded)")
    p.add_argument("--eval", dest="eval_data", help="print top-1 of student and teacher on this data every epoch")
    p.add_argument("--eval-samples", type=positive_int, help="evaluate on this many samples of --eval")
    how = p.add_argument_group("how long")
    how.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    how.add_argument("--steps", type=int, help="optimiser steps instead of --epochs")
    how.add_argument("--batch", type=positive_int, default=64, help="training batch size (default 64)")
    opt = p.add_argument_group("optimiser")
    opt.add_argument(
        "--optimizer", choices=["adamw", "sgd"], default="adamw", help="AdamW (default), or SGD with Nesterov momentum"
    )
    opt.add_argument("--lr", type=float, help="peak learning rate, cosine schedule (default: AdamW 1e-3, SGD 5e-3)")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    opt.add_argument("--weight-decay", type=float, help="on weight tensors only (default: AdamW 0.02, SGD 5e-4)")
    opt.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, a fraction of all steps")
    opt.add_argument("--clip", type=float, default=5.0, help="gradient norm clipping (0: off)")
    loss = p.add_argument_group("loss")
    loss.add_argument(
        "--temperature", default="4", help="distillation temperature T, or START:END (SFP's variable temperature)"
    )
    loss.add_argument("--kd", type=float, default=1.0, help="weight of the distillation loss")
    loss.add_argument("--ce", type=float, help="weight of the cross-entropy (default 1 with labels)")
    loss.add_argument(
        "--feature",
        dest="features",
        action="append",
        default=[],
        metavar="TENSOR",
        help="also match this intermediate tensor of student and teacher (same shape in both; repeatable)",
    )
    loss.add_argument("--feature-weight", type=float, default=1.0, help="weight of the --feature loss (default 1.0)")
    loss.add_argument(
        "--output-loss",
        dest="output_losses",
        action="append",
        default=[],
        type=_output_loss,
        metavar="OUTPUT=LOSS",
        help="the distillation loss of this graph output: kl, smooth-l1, mse, channel-kl, cosine, yolo or none "
        "(repeatable; default: chosen from what each output is, see docs/finetune.md)",
    )
    aug = p.add_argument_group("augmentation")
    aug.add_argument("--crop-pad", type=int, default=4, help="random crop after padding by N pixels (0: none)")
    aug.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip (e.g. digits)")
    p.add_argument("--freeze", action="append", default=[], metavar="NODE_PATTERN", help="leave these nodes' weights")
    p.add_argument(
        "--bn",
        choices=["auto", "insert", "keep", "off"],
        default="auto",
        help="BatchNormalization while training: insert one after each conv (and hidden Gemm) for training and fold "
        "it back (auto: when the graph has none, as an eval-mode export folds it), keep the graph as it is, off: "
        "running statistics only",
    )
    p.add_argument(
        "--bn-init",
        choices=["teacher", "identity"],
        default="teacher",
        help="inserted BNs start from the teacher's channel statistics (what batch statistics give a BN-kept graph) "
        "or unchanged from the student's",
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="torch device (default auto: cuda if present)"
    )
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, shuffling and augmentation (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint an interrupted run left")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT.ckpt after a finished run")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def _output_loss(text: str) -> tuple[str, str]:
    from carve.pipeline.training.losses import LOSSES

    name, sep, loss = text.rpartition("=")
    if not sep or not name or loss not in LOSSES:
        raise argparse.ArgumentTypeError(f"{text!r}: give OUTPUT=LOSS with LOSS one of {', '.join(LOSSES)}")
    return name, loss


def run(args: argparse.Namespace) -> int:
    import json

    from carve.pipeline.cli._common import command_line, console
    from carve.pipeline.config import from_args
    from carve.pipeline.flows.finetune import finetune_file
    from carve.pipeline.training.finetune import FinetuneOptions

    opts = from_args(FinetuneOptions, args, output_losses=dict(args.output_losses))
    opts.check()
    con = console(args.quiet or args.json)
    with _TrainingProgress(con, enabled=not (args.quiet or args.json)) as show:
        result, accuracy = finetune_file(
            args.model,
            args.output,
            args.data,
            opts,
            teacher_path=args.teacher,
            samples=args.samples,
            eval_data=args.eval_data,
            eval_samples=args.eval_samples,
            resume=args.resume,
            keep_checkpoint=args.keep_checkpoint,
            progress=show,
            command=command_line(),
        )
    summary = {**result.summary, "accuracy": accuracy}
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    s = result.summary
    con.print(
        f"trained {s['steps']} steps ({s['epochs']} epochs, {s['images']:,} images) in {s['seconds']:.0f} s on "
        f"{s['device']}: {s['images_per_s']:.0f} images/s"
        + (f", resumed from epoch {s['resumed_from_epoch']}" if s.get("resumed_from_epoch") else "")
    )
    if accuracy:
        final = accuracy["final"]
        line = f"top-1 {final['top1']:.2%}" if "top1" in final else f"{final['samples']} samples"
        if "detection" in final:
            line = f"mAP@0.5 {final['detection']['map50']:.2%}"
            if "detection" in accuracy.get("teacher", {}):
                line += f" (teacher {accuracy['teacher']['detection']['map50']:.2%})"
        if "teacher" in accuracy and "top1" in accuracy["teacher"]:
            line += f" (teacher {accuracy['teacher']['top1']:.2%})"
        if "top1_agreement" in final.get("reference", {}):
            who = "the teacher" if args.teacher else "the model before fine-tuning"
            line += f"; top-1 agreement with {who} {final['reference']['top1_agreement']:.2%}"
        if "held_back" in accuracy:
            where = f"{final['samples']} images of {args.data} held back from training (--eval chooses other data)"
        else:
            where = f"{final['samples']} samples of {args.eval_data}"
        con.print(f"{line} on {where}")
    outputs = s["losses"].get("outputs") or {}
    if len(outputs) > 1 or any(o["loss"] != "kl" for o in outputs.values()):
        con.print("distilled: " + ", ".join(f"{n} {o['loss']} ({o['why']})" for n, o in outputs.items()))
    con.print(
        f"verified: checker, output shapes, finite weights; ONNX Runtime equals the trained module "
        f"(max relative {s['torch_vs_ort']['max_rel']:.1e})"
    )
    con.print(f"wrote {args.output}")
    return 0


class _TrainingProgress:
    """A rich progress bar (loss, learning rate, images/s, ETA) on a terminal; one log line per epoch (and every
    ~10% of the steps) on stderr otherwise. Per-epoch evaluation is printed as it comes."""

    def __init__(self, con, enabled: bool) -> None:
        self.con, self.enabled = con, enabled
        self.tty = enabled and sys.stdout.isatty()
        self.bar = None
        self.task = None
        self.next_log = 0

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[rate]:.0f} img/s"),
                TimeRemainingColumn(),
                console=self.con,
                transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int | None = None, total: int | None = None, **e) -> None:
        """The :class:`carve.pipeline.progress.Progress` of a fine-tuning run: ``train: step`` and ``train: epoch``."""
        if not self.enabled:
            return
        if stage == "train: step":
            if self.bar is not None:
                if self.task is None:
                    self.task = self.bar.add_task("train", total=total, epoch=1, loss=0.0, lr=0.0, rate=0.0)
                self.bar.update(
                    self.task,
                    completed=done,
                    epoch=f"{e['epoch']}/{e['epochs']}",
                    loss=e["loss"],
                    lr=e["lr"],
                    rate=e["images_per_s"],
                )
            elif done >= self.next_log:
                self.next_log = done + max(1, total // 10)
                eta = f", ETA {e['eta_s'] / 60:.1f} min" if e.get("eta_s") else ""
                print(
                    f"step {done}/{total} (epoch {e['epoch']}/{e['epochs']}): loss {e['loss']:.4f}, "
                    f"lr {e['lr']:.2e}, {e['images_per_s']:.0f} images/s{eta}",
                    file=sys.stderr,
                    flush=True,
                )
            return
        if stage != "train: epoch":
            return
        line = f"epoch {done}/{total}: loss {e['loss']:.4f}"
        if "top1" in e:
            line += f", top-1 {e['top1']:.2%}"
            if "teacher_top1" in e:
                line += f" (teacher {e['teacher_top1']:.2%})"
        (self.bar.console.print if self.bar is not None else self.con.print)(line)
