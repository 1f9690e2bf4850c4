"""LeNet-5 (LeCun et al. 1998) for 1 x 32 x 32 inputs: conv/pool/conv/pool then three fully connected layers.

Its Flatten -> Linear exercises the "consumer owns H x W columns per channel" case of the channel analysis. Trained
weights come from training on scikit-learn's digits in seconds (:mod:`carve.models.train`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelSpec, register


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


register(
    ModelSpec(
        name="lenet5",
        description="LeNet-5, 1x32x32 digits",
        input_shape=(1, 32, 32),
        num_classes=10,
        family="lenet",
        exercises="Flatten -> Gemm (25 columns per channel), MLP head",
        build=lambda size: LeNet5(),
        mean=(0.5,),
        std=(0.5,),
        trained="digits",
    )
)
