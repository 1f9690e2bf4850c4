"""Export a zoo model (or any torch module) to ONNX the way carve expects to find it.

By default the legacy TorchScript exporter (``dynamo=False``; it needs no onnxscript) with
``training=TrainingMode.PRESERVE`` on a model in eval mode: BatchNormalization stays a node (the exporter folds it
into the convolutions otherwise, and BN-scale criteria need it); ``fold_bn=True`` folds it. ``exporter="dynamo"`` uses
``torch.export`` + onnxscript (opset 18 or newer; it always folds BN). Dynamic batch axis by default. The file is
written atomically with metadata: ``carve.source``, ``carve.weights``, ``carve.preprocess`` (layout, size, mean/std:
how to feed it) and ``carve.version``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from carve.pipeline.errors import CarveError, MissingDependencyError

from .registry import get_spec
from .weights import with_weights


@dataclass
class ExportInfo:
    path: Path
    name: str
    input_name: str
    input_shape: tuple[int, ...]
    outputs: list[str]
    weights: str
    opset: int
    fold_bn: bool
    exporter: str
    warnings: list[str] = field(default_factory=list)


def build(name: str, *, weights: str = "auto", input_size: int | None = None) -> nn.Module:
    """A zoo model in eval mode, with its weights (see :func:`carve.models.weights.with_weights`)."""
    spec = get_spec(name)
    spec.input(input_size)  # validates input_size
    torch.manual_seed(0)  # random weights are reproducible
    model, _, _ = with_weights(spec, spec.build(input_size), weights)
    return model.eval()


def export(
    name: str,
    path: str | Path,
    *,
    weights: str = "auto",
    fold_bn: bool = False,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_size: int | None = None,
    exporter: str = "torchscript",
) -> ExportInfo:
    from carve.pipeline.graph import check_output_path, save
    from carve.pipeline.version import __version__

    # the weights file is an input (issue 21): `--weights w.th -o w.th` must not overwrite it
    path = check_output_path(path, weights if weights not in ("auto", "random") else None)
    spec = get_spec(name)
    shape = spec.input(input_size)
    torch.manual_seed(0)
    model, source, warns = with_weights(spec, spec.build(input_size), weights)
    model.eval()
    proto = to_onnx(
        model, (1, *shape), spec.outputs, opset=opset, fold_bn=fold_bn, dynamic_batch=dynamic_batch, exporter=exporter
    )
    meta = {
        "carve.source": f"zoo:{name}",
        "carve.weights": source,
        "carve.version": __version__,
        "carve.exporter": exporter,
        "carve.preprocess": json.dumps(
            {
                "layout": "NCHW",
                "size": list(shape[1:]),
                "channels": shape[0],
                "mean": list(spec.mean),
                "std": list(spec.std),
            }
        ),
    }
    if spec.output_kinds:  # what each output is: fine-tuning picks its distillation loss from it
        meta["carve.outputs"] = json.dumps(spec.output_kinds)
    if spec.detection and input_size in (None, shape[1]):  # anchors are in pixels of the trained input size
        meta["carve.detection"] = json.dumps(spec.detection)
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    save(proto, path)
    return ExportInfo(path, name, "input", (1, *shape), spec.outputs, source, opset_of(proto), fold_bn, exporter, warns)


def max_opset(exporter: str) -> int:
    """The newest opset the exporter writes (torch's TorchScript exporter stops before onnx's newest)."""
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if exporter == "torchscript":
        try:
            from torch.onnx import _constants

            return min(newest, int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET))
        except (ImportError, AttributeError):  # pragma: no cover - older or newer torch
            return min(newest, 20)
    return newest


def check_opset(opset: int, exporter: str) -> None:
    """Refuse an opset the exporter cannot write before it starts (it would dump its IR and fail)."""
    top = max_opset(exporter)
    low = 18 if exporter == "dynamo" else 11
    if not 11 <= opset <= top:
        raise CarveError(
            f"`opset={opset}`: the {exporter} exporter writes opsets {low} to {top}",
            hint=f"use `opset={min(max(opset, low), top)}`",
        )


def opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def to_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    outputs: list[str],
    *,
    opset: int = 17,
    fold_bn: bool = False,
    dynamic_batch: bool = True,
    exporter: str = "torchscript",
) -> onnx.ModelProto:
    x = torch.randn(*input_shape)
    check_opset(opset, exporter)
    if exporter == "torchscript":
        mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
        axes = {"input": {0: "N"}, **{o: {0: "N"} for o in outputs}} if dynamic_batch else None
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            f = Path(tmp) / "m.onnx"
            torch.onnx.export(
                model,
                (x,),
                str(f),
                dynamo=False,
                opset_version=opset,
                training=mode,
                input_names=["input"],
                output_names=outputs,
                dynamic_axes=axes,
            )
            return onnx.load(f)
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "the dynamo exporter needs onnxscript",
                hint="pip install onnxscript, or use the default `exporter=torchscript`",
            ) from None
        dyn = ({0: torch.export.Dim("N", min=1, max=1024)},) if dynamic_batch else None
        with _quiet():
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=max(opset, 18),
                dynamic_shapes=dyn,
                input_names=["input"],
                output_names=outputs,
            )
        return program.model_proto
    raise CarveError(f"unknown exporter {exporter!r}; valid: torchscript, dynamo")


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings: keep the user's terminal for carve's own messages."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
