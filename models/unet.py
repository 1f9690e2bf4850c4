"""A small UNet (Ronneberger et al. 2015): three down levels, a bottleneck, three up levels with concatenated skip
connections (two upsampled by ConvTranspose, one by Resize), per-pixel class logits. Exercises Concat of skip and
upsampled channels and ConvTranspose producers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelSpec, register


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, classes: int = 4, base: int = 16) -> None:
        super().__init__()
        b = base
        self.enc1, self.enc2, self.enc3 = double_conv(3, b), double_conv(b, 2 * b), double_conv(2 * b, 4 * b)
        self.bottleneck = double_conv(4 * b, 8 * b)
        self.up3 = nn.ConvTranspose2d(8 * b, 4 * b, 2, stride=2)
        self.dec3 = double_conv(8 * b, 4 * b)
        self.up2 = nn.ConvTranspose2d(4 * b, 2 * b, 2, stride=2)
        self.dec2 = double_conv(4 * b, 2 * b)
        self.up1 = nn.Conv2d(2 * b, b, 1)  # after a bilinear Resize
        self.dec1 = double_conv(2 * b, b)
        self.head = nn.Conv2d(b, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.bottleneck(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(m), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        u1 = self.up1(F.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False))
        d1 = self.dec1(torch.cat([u1, e1], 1))
        return self.head(d1)


register(
    ModelSpec(
        name="unet",
        description="small UNet, 3x64x64 -> 4-class masks",
        input_shape=(3, 64, 64),
        num_classes=4,
        family="segmentation",
        exercises="skip concatenations, ConvTranspose and Resize upsampling",
        build=lambda size: UNet(),
        resizable=True,
        outputs=["masks"],
    )
)
