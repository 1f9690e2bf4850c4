"""What the zoo holds: one :class:`ModelSpec` per model, and how to build it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from carve.pipeline.errors import CarveError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    name: str
    description: str
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    family: str
    exercises: str  # what it exercises in the channel analysis
    build: Callable  # (input_size: int | None) -> nn.Module with random weights
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    trained: str | None = None  # how trained weights are obtained: "shared:<file glob>" or "digits"
    outputs: list[str] = field(default_factory=lambda: ["logits"])
    resizable: bool = False  # whether input_size may change the input
    output_kinds: dict[str, str] = field(default_factory=dict)  # output -> logits | regression | dense | embedding
    detection: dict | None = None  # how to decode the heads (carve.detection metadata, pipeline/measure/detection.py)

    def input(self, input_size: int | None = None) -> tuple[int, int, int]:
        c, h, w = self.input_shape
        if input_size is not None:
            if not self.resizable:
                raise CarveError(f"model {self.name!r} takes a fixed {h}x{w} input; `input_size` does not apply")
            return (c, input_size, input_size)
        return self.input_shape


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    _load()
    try:
        return REGISTRY[name]
    except KeyError:
        raise CarveError(
            f"unknown model {name!r}; the zoo has: {', '.join(sorted(REGISTRY))}",
            hint="`carve export --list` shows them",
        ) from None


def names() -> list[str]:
    _load()
    return sorted(REGISTRY)


def _load() -> None:
    from . import cifar_resnet, detector, lenet, torchvision_models, unet, vgg, vit  # noqa: F401
