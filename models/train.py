"""Training on built-in data: a small, deterministic loop, and LeNet-5 on scikit-learn's digits in seconds.

The digits come from :func:`carve.pipeline.data.datasets.digits_arrays` (a seeded, stratified train/test split of the
1,797 real 8x8 images shipped inside scikit-learn) and are prepared with the same
:class:`~carve.pipeline.data.datasets.Preprocess` the exported model records, so ``carve eval --data digits:test``
measures exactly what training saw."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carve.pipeline.data.augment import Augment
from carve.pipeline.data.datasets import Dataset, Preprocess, digits_arrays, load_data
from carve.pipeline.errors import CarveError

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
        pred = [model(torch.from_numpy(x[k : k + 500])).argmax(1).numpy() for k in range(0, len(x), 500)]
    pred = np.concatenate(pred)
    return float((pred == y).mean())


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 2e-3,
    batch: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    augment: Augment | None = None,
    label_smoothing: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Adam (AdamW with ``weight_decay``) with a one-cycle schedule, optional crop-and-flip ``augment`` and label
    smoothing; deterministic for a seed (single-threaded, fixed shuffling)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if weight_decay:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for epoch in range(epochs):
            order = torch.from_numpy(rng.permutation(len(x)))
            for k in range(0, len(x), batch):
                idx = order[k : k + batch]
                xb = torch.from_numpy(augment(x[idx.numpy()], rng)) if augment else xt[idx]
                opt.zero_grad()
                F.cross_entropy(model(xb), yt[idx], label_smoothing=label_smoothing).backward()
                opt.step()
                sched.step()
            if log:
                log(f"epoch {epoch + 1}/{epochs}")
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


VIT_EPOCHS = 15


def vit_cache_path(seed: int = 0) -> Path:
    """Where :func:`vit_cifar10` keeps the trained ViT (``carve export vit`` reads it from there)."""
    return cache_dir() / f"vit-cifar10-seed{seed}-v{CACHE_VERSION}.pt"


def cifar10(split: str, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from ../shared (``train``: the 10,000-image subset, ``test``: all 10,000), preprocessed."""
    from carve.pipeline.data.shared import missing_reason, shared_file

    name = {"train": "train_subset.npz", "test": "test.npz"}[split]
    if shared_file("data", "cifar10", name) is None:
        raise CarveError(f"CIFAR-10 {split}: {missing_reason('data', 'cifar10', name)}", hint="set $CARVE_SHARED")
    x, y = load_data(f"shared:data/cifar10/{name}", preprocess=preprocess).arrays()
    return x, y


def vit_cifar10(
    seed: int = 0, *, epochs: int = VIT_EPOCHS, use_cache: bool = True, log: Callable[[str], None] | None = None
) -> tuple[nn.Module, dict]:
    """The zoo's ViT trained on the CIFAR-10 train subset (AdamW, one-cycle, crop and flip, label smoothing 0.1),
    its test top-1 on all 10,000 test images. Cached on disk (``$CARVE_CACHE``): a few CPU-minutes the first time."""
    from .vit import CIFAR_MEAN, CIFAR_STD, ViT

    pre = Preprocess(size=(32, 32), channels=3, mean=CIFAR_MEAN, std=CIFAR_STD)
    path = vit_cache_path(seed)
    t0 = time.perf_counter()
    if use_cache and path.is_file():
        model = ViT()
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        return model.eval(), {**torch.load(path, weights_only=True)["metrics"], "cached": True}
    xtr, ytr = cifar10("train", pre)
    torch.manual_seed(seed)
    model = train(
        ViT(),
        xtr,
        ytr,
        epochs=epochs,
        lr=2e-3,
        batch=128,
        seed=seed,
        weight_decay=0.05,
        augment=Augment(pad=4, flip=True),
        label_smoothing=0.1,
        log=log,
    )
    xte, yte = cifar10("test", pre)
    metrics = {
        "train_acc": accuracy(model, xtr, ytr),
        "test_acc": accuracy(model, xte, yte),
        "epochs": epochs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "metrics": metrics}, tmp)
        os.replace(tmp, path)
    return model.eval(), {**metrics, "cached": False}


# zoo models trained by tools/train_zoo.py into the cache: name in ModelSpec.trained ("cache:NAME") -> cache file
CACHED = {
    "vit-cifar10": lambda: vit_cache_path(),
    "detector-digits": lambda: cache_dir() / f"detector-digits-seed0-v{CACHE_VERSION}.pt",
}


def trained_in_cache(spec, model: nn.Module, warnings: list[str]) -> tuple[nn.Module, str, list[str]]:
    """Weights a tool trained into the cache, or random weights with a warning saying how to train them."""
    path = CACHED[spec.trained.split(":", 1)[1]]()
    if not path.is_file():
        warnings.append(
            f"no trained weights at {path}; random weights used (train them: python tools/train_zoo.py {spec.name})"
        )
        return model, "random", warnings
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["state_dict"])
    m = saved["metrics"]
    what = f" (test top-1 {m['test_acc']:.3f})" if "test_acc" in m else ""
    what = f" (test mAP@0.5 {m['test_map50']:.3f})" if "test_map50" in m else what
    return model, f"trained: {path.name}{what}", warnings
