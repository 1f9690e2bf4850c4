"""torchvision's ImageNet classifiers with random weights (no downloads): ResNet-18/50 (bottlenecks, projection
shortcuts), MobileNetV2 (inverted residuals, depthwise, ReLU6), MobileNetV3-Small (SE blocks, hardswish),
EfficientNet-B0 (SE, SiLU), DenseNet-121 (dense concatenations). torchvision is optional: imported when built."""

from __future__ import annotations

from carve.pipeline.errors import MissingDependencyError

from .registry import ModelSpec, register

MODELS = {
    "resnet18": "bottleneck-free residual blocks with 1x1 projection shortcuts",
    "resnet50": "bottleneck residual blocks, projection shortcuts",
    "mobilenet_v2": "depthwise convs, inverted residuals, ReLU6 (Clip)",
    "mobilenet_v3_small": "SE blocks (GAP -> conv -> act -> conv -> hardsigmoid -> Mul), hardswish",
    "efficientnet_b0": "SE blocks with SiLU, depthwise convs",
    "densenet121": "dense concatenations on the channel axis",
}


def _build(name: str):
    def build(size):
        try:
            import torchvision
        except Exception as exc:  # ImportError, or a broken install ("operator torchvision::nms does not exist")
            raise MissingDependencyError(
                f"model {name!r} needs torchvision ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                hint="pip install 'carve[zoo]' (with a torchvision that matches your torch)",
            ) from None
        return getattr(torchvision.models, name)(weights=None)

    return build


for _name, _what in MODELS.items():
    register(
        ModelSpec(
            name=_name,
            description=f"torchvision {_name} (random weights)",
            input_shape=(3, 224, 224),
            num_classes=1000,
            family="torchvision",
            exercises=_what,
            build=_build(_name),
            resizable=True,
        )
    )
