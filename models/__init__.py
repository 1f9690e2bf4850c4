"""The model zoo: torch definitions, trained weights where we have them, and ONNX export.

import carve.models as models
models.available()                        # names
models.spec("resnet56")                   # input shape, classes, what it exercises, trained weights?
models.build("resnet56")                  # nn.Module in eval mode (trained weights from ../shared when present)
models.export("resnet56", "r56.onnx")     # ONNX with BN kept, dynamic batch, preprocessing in the metadata
"""

from __future__ import annotations

from .export import ExportInfo, build, export
from .registry import ModelSpec, get_spec, names
from .weights import shared_checkpoint


def available() -> list[str]:
    return names()


def spec(name: str) -> ModelSpec:
    return get_spec(name)


def has_trained_weights(name: str) -> bool:
    s = get_spec(name)
    if s.trained and s.trained.startswith("cache:"):
        from .train import CACHED

        return CACHED[s.trained.split(":", 1)[1]]().is_file()
    return s.trained == "digits" or shared_checkpoint(s) is not None


__all__ = ["available", "spec", "build", "export", "ExportInfo", "ModelSpec", "has_trained_weights"]
