"""Standard image augmentation for fine-tuning, on preprocessed N x C x H x W batches: a random crop of the original
size from the batch zero-padded by ``pad`` pixels (zero is the dataset mean after normalisation) and a random
horizontal flip (the CIFAR recipe of He et al., CVPR 2016). Seeded: the same generator state gives the same batch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Augment:
    pad: int = 4  # random-crop padding in pixels (0: no crop)
    flip: bool = True  # random horizontal flip

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n, _, h, w = x.shape
        out = x
        if self.pad > 0:
            p = self.pad
            padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
            dy, dx = rng.integers(0, 2 * p + 1, n), rng.integers(0, 2 * p + 1, n)
            out = np.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        if self.flip:
            flip = rng.random(n) < 0.5
            if flip.any():
                out = out.copy() if out is x else out
                out[flip] = out[flip][..., ::-1]
        return np.ascontiguousarray(out, dtype=np.float32)
