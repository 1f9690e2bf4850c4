"""A small single-stage detector in the YOLO style: Conv/BN/SiLU backbone, CSP blocks that Split a tensor on the
channel axis and Concat the halves back after bottlenecks, an FPN-like neck (Resize upsampling + Concat), and two
prediction heads. Exercises Split/Concat on the channel axis, SiLU = x * sigmoid(x), residual bottlenecks, and
several graph outputs. Its weights are trained by ``python tools/train_zoo.py detector`` on carve's synthetic digit
detection set (:mod:`carve.models.train_detector`); its heads decode as YOLOv3's (``carve.detection`` metadata)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelSpec, register

# (stride, anchors w x h in pixels) per head: out0 on the stride-4 map, out1 on the stride-8 map; sized for the
# synthetic digit-detection set (digits 14-30 pixels tall) the detector is trained on
HEADS = {"out0": (4, [[9, 15], [13, 19], [17, 23]]), "out1": (8, [[20, 25], [24, 29], [28, 33]])}


class ConvBNSiLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = ConvBNSiLU(c, c, 1), ConvBNSiLU(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class CSP(nn.Module):
    """1x1 conv, split the channels in two halves, bottlenecks on one half, concat, 1x1 conv."""

    def __init__(self, c: int, n: int = 2) -> None:
        super().__init__()
        self.inp = ConvBNSiLU(c, c, 1)
        self.blocks = nn.Sequential(*[Bottleneck(c // 2) for _ in range(n)])
        self.out = ConvBNSiLU(c, c, 1)
        self.half = c // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.inp(x), [self.half, self.half], dim=1)
        return self.out(torch.cat([self.blocks(a), b], 1))


class Detector(nn.Module):
    def __init__(self, classes: int = 8, anchors: int = 3) -> None:
        super().__init__()
        per = anchors * (5 + classes)
        self.stem = ConvBNSiLU(3, 16, 3, 2)
        self.down1, self.csp1 = ConvBNSiLU(16, 32, 3, 2), CSP(32)
        self.down2, self.csp2 = ConvBNSiLU(32, 64, 3, 2), CSP(64)
        self.lateral = ConvBNSiLU(64, 32, 1)
        self.fuse = ConvBNSiLU(64, 32, 3)
        self.head_small = nn.Conv2d(32, per, 1)
        self.head_large = nn.Conv2d(64, per, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.csp1(self.down1(self.stem(x)))
        p4 = self.csp2(self.down2(p3))
        up = F.interpolate(self.lateral(p4), scale_factor=2.0, mode="nearest")
        n3 = self.fuse(torch.cat([up, p3], 1))
        return self.head_small(n3), self.head_large(p4)


register(
    ModelSpec(
        name="detector",
        description="small YOLO-style detector, 3x64x64, two heads (trained on synthetic digit detection)",
        input_shape=(3, 64, 64),
        num_classes=8,
        family="detection",
        exercises="CSP Split/Concat on channels, SiLU, FPN Resize + Concat, 2 outputs",
        build=lambda size: Detector(),
        resizable=True,
        outputs=["out0", "out1"],
        # raw YOLO heads: box offsets, objectness and class logits per anchor and cell, not a distribution over channels
        output_kinds={"out0": "regression", "out1": "regression"},
        detection={
            "format": "yolo-anchors",
            "classes": 8,
            "heads": {h: {"stride": s, "anchors": a} for h, (s, a) in HEADS.items()},
        },
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        trained="cache:detector-digits",
    )
)
