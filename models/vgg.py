"""VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015; the common CIFAR variant: 13 conv/BN/ReLU layers,
five max-pools, one linear classifier on the 512-d feature). A plain chain: every layer is its own channel group."""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelSpec, register

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


register(
    ModelSpec(
        name="vgg16_bn",
        description="VGG-16-BN for CIFAR",
        input_shape=(3, 32, 32),
        num_classes=10,
        family="vgg",
        exercises="plain conv chain, BN after every conv",
        build=lambda size: VGG16BN(),
    )
)
