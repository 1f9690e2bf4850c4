"""Small transformer modules written the way timm, transformers and torchvision write theirs, for export tests that
need no optional package: a ViT (patch conv, class token, fused QKV unbound from a permuted reshape, pre-LN), a
BERT-style encoder (embeddings, separate Q/K/V, post-LN), a ConvNeXt stage (channels-last LayerNorm between permutes),
a Swin-style window attention with a relative position bias, and torch's own ``nn.MultiheadAttention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm's ``Attention``: one QKV Linear, ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.hd, self.sdpa = heads, dim // heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa and bias is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q * self.hd**-0.5) @ k.transpose(-2, -1)
            if bias is not None:
                a = a + bias
            o = a.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, sdpa)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3, depth: int = 2, classes: int = 5, sdpa: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyBert(nn.Module):
    """transformers' BERT layout: word + position embeddings, LayerNorm, then post-LN layers with separate
    query/key/value projections viewed as ``[B, T, H, D]`` and permuted; a pooler on the first token."""

    def __init__(self, vocab: int = 30, dim: int = 24, heads: int = 4, depth: int = 2, tokens: int = 8) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.word, self.pos = nn.Embedding(vocab, dim), nn.Embedding(tokens, dim)
        self.register_buffer("ids", torch.arange(tokens)[None])
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(
                nn.ModuleDict(
                    dict(
                        q=nn.Linear(dim, dim),
                        k=nn.Linear(dim, dim),
                        v=nn.Linear(dim, dim),
                        o=nn.Linear(dim, dim),
                        ln1=nn.LayerNorm(dim),
                        up=nn.Linear(dim, 2 * dim),
                        down=nn.Linear(2 * dim, dim),
                        ln2=nn.LayerNorm(dim),
                    )
                )
            )
        self.pool, self.cls = nn.Linear(dim, dim), nn.Linear(dim, 3)

    def split(self, x):
        return x.view(*x.size()[:-1], self.heads, self.hd).permute(0, 2, 1, 3)

    def forward(self, ids):
        x = self.ln(self.word(ids) + self.pos(self.ids))
        for m in self.layers:
            q, k, v = self.split(m["q"](x)), self.split(m["k"](x)), self.split(m["v"](x))
            a = torch.softmax(q @ k.transpose(-1, -2) / self.hd**0.5, dim=-1) @ v
            a = a.permute(0, 2, 1, 3).contiguous()
            a = m["o"](a.view(*a.size()[:-2], self.heads * self.hd))
            x = m["ln1"](x + a)
            x = m["ln2"](x + m["down"](F.gelu(m["up"](x))))
        return self.cls(torch.tanh(self.pool(x[:, 0])))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class WindowBlock(nn.Module):
    """Swin's block on a [B, H*W, C] stream: window partition, attention with a relative position bias gathered from
    a table, window reverse."""

    def __init__(self, dim: int = 16, heads: int = 2, size: int = 4, win: int = 2) -> None:
        super().__init__()
        self.size, self.win, self.heads = size, win, heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.table = nn.Parameter(torch.randn((2 * win - 1) ** 2, heads) * 0.1)
        coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (win - 1)
        self.register_buffer("index", rel[..., 0] * (2 * win - 1) + rel[..., 1])
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        s, w = self.size, self.win
        y = self.norm1(x).view(b, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        bias = self.table[self.index.view(-1)].view(w * w, w * w, -1).permute(2, 0, 1).unsqueeze(0)
        y = self.attn(y, bias)
        y = y.view(-1, s // w, s // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)
        x = x + y
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.block = WindowBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(x)).mean(1))


class TorchMHA(nn.Module):
    """torch's own ``nn.MultiheadAttention`` in a pre-LN block (its in_proj is one [3C, C] weight)."""

    def __init__(self, dim: int = 16, heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        y = self.norm(x)
        x = x + self.mha(y, y, y, need_weights=False)[0]
        return self.head(x.mean(1))
