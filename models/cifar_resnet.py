"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of n BasicBlocks with 16/32/64 channels, depth 6n + 2.

Shortcuts are "option A" exactly like the trained checkpoints in ``../shared/models/cifar10`` (Idelbayev's
pytorch_resnet_cifar10): a stride-2 block subsamples its input with stride 2 and zero-pads it on the channel axis,
which exports as Slice + Pad and couples the three stages into one residual channel group. The module names match
the checkpoints' state-dict keys (without their ``module.`` prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelSpec, register


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0) if self.pad else x
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n + 2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for k in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if k == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


for _depth in (20, 32, 44, 56):
    register(
        ModelSpec(
            name=f"resnet{_depth}",
            description=f"CIFAR ResNet-{_depth} (option-A shortcuts)",
            input_shape=(3, 32, 32),
            num_classes=10,
            family="cifar-resnet",
            exercises="option-A zero-pad shortcut coupling all three stages",
            build=(lambda d: lambda size: CifarResNet(d))(_depth),
            trained=f"shared:resnet{_depth}-*.th",
        )
    )
