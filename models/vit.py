"""A small Vision Transformer for CIFAR-10 (Dosovitskiy et al., ICLR 2021), written the way timm writes its ViT: a
4x4 patch convolution, a class token and learned position embeddings, pre-LayerNorm blocks whose attention is one
fused QKV Linear split by ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)``, a GELU MLP, and a Linear head on the
class token. It exercises what carve prunes in a transformer: attention heads, the MLP hidden width, and the
embedding width of the residual stream under LayerNorm (an inexact removal, repaired by fine-tuning).

Trained weights are not shipped: ``python tools/train_zoo.py vit`` trains it on ``../shared/data/cifar10``'s 10,000
training images (a few CPU-minutes) into the cache (:func:`carve.models.train.cache_dir`), where ``carve export vit``
finds them."""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelSpec, register

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q * self.hd**-0.5) @ k.transpose(-2, -1)
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(
        self, dim: int = 64, heads: int = 4, depth: int = 4, mlp: int = 128, patch: int = 4, size: int = 32
    ) -> None:
        super().__init__()
        tokens = (size // patch) ** 2 + 1
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


register(
    ModelSpec(
        name="vit",
        description="small ViT for CIFAR-10 (4 blocks, width 64, 4 heads), 3x32x32",
        input_shape=(3, 32, 32),
        num_classes=10,
        family="transformer",
        exercises="attention heads (fused QKV), MLP width, embedding width under LayerNorm",
        build=lambda size: ViT(),
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        trained="cache:vit-cifar10",
    )
)
