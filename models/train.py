"""Training on built-in data: a small, deterministic loop, and LeNet-5 on scikit-learn's digits in seconds.

The digits come from :func:`carve.pipeline.data.datasets.digits_arrays` (a seeded, stratified train/test split of the
1,797 real 8x8 images shipped inside scikit-learn) and are prepared with the same
:class:`~carve.pipeline.data.datasets.Preprocess` the exported model records, so ``carve eval --data digits:test``
measures exactly what training saw."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carve.pipeline.data.datasets import Dataset, Preprocess, digits_arrays

DIGITS_PREPROCESS = Preprocess(size=(32, 32), channels=1, mean=(0.5,), std=(0.5,))
CACHE_VERSION = 1  # bump when the training recipe changes


def digits(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits as LeNet-5 inputs: N x 1 x 32 x 32 float32 and labels."""
    images, labels = digits_arrays(split, seed=seed)
    x, y = Dataset(images, labels, f"digits:{split}", DIGITS_PREPROCESS).arrays()
    return x, y


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 2e-3,
    batch: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Adam with a cosine schedule; deterministic for a seed (single-threaded, fixed shuffling)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(x)))
            for k in range(0, len(x), batch):
                idx = order[k : k + batch]
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def cache_dir() -> Path:
    return Path(os.environ.get("CARVE_CACHE", Path.home() / ".cache" / "carve"))


def lenet5_digits(seed: int = 0, *, use_cache: bool = True) -> tuple[nn.Module, dict]:
    """LeNet-5 trained on the digits train split; metrics on both splits. Cached on disk (``$CARVE_CACHE``)."""
    from .lenet import LeNet5

    model = LeNet5()
    path = cache_dir() / f"lenet5-digits-seed{seed}-v{CACHE_VERSION}-torch{torch.__version__}.pt"
    xtr, ytr = digits("train", seed)
    xte, yte = digits("test", seed)
    t0 = time.perf_counter()
    if use_cache and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        cached = True
    else:
        torch.manual_seed(seed)
        model = train(LeNet5(), xtr, ytr, seed=seed)
        cached = False
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
    metrics = {
        "train_acc": accuracy(model, xtr, ytr),
        "test_acc": accuracy(model, xte, yte),
        "seconds": round(time.perf_counter() - t0, 2),
        "cached": cached,
    }
    return model.eval(), metrics
