"""Training the zoo detector on carve's synthetic digit-detection set (:mod:`carve.pipeline.data.detection`), so its
mAP against ground truth means something (``carve eval det.onnx --data detect-digits:test``).

The loss is YOLOv3's (Redmon and Farhadi, 2018): every ground-truth box is assigned to the one anchor (over both heads)
whose shape matches it best, at the cell holding its centre; that anchor learns the centre offset (binary cross-entropy
on sigmoid(tx), sigmoid(ty)), the log size ratio to the anchor (squared error), objectness 1 and the class (cross-
entropy); every other anchor learns objectness 0. Adam, one-cycle schedule, deterministic for a seed, single-threaded.
Cached on disk (``$CARVE_CACHE``) like the other trained zoo weights."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carve.pipeline.data.datasets import Preprocess

from .detector import HEADS, Detector
from .registry import IMAGENET_MEAN, IMAGENET_STD
from .train import CACHE_VERSION, cache_dir

PREPROCESS = Preprocess(size=(64, 64), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
EPOCHS = 15


def detector_cache_path(seed: int = 0) -> Path:
    return cache_dir() / f"detector-digits-seed{seed}-v{CACHE_VERSION}.pt"


def assign(boxes: np.ndarray, n: int, classes: int, sizes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Per head, the targets of a batch of ``n`` images with ``boxes`` rows (image, class, x1, y1, x2, y2)."""
    anchors = [(h, a, np.asarray(wh, np.float32)) for h, (_, aa) in HEADS.items() for a, wh in enumerate(aa)]
    out = {}
    for head, (_, aa) in HEADS.items():
        gh, gw = sizes[head]
        out[head] = {
            "obj": np.zeros((n, len(aa), gh, gw), np.float32),
            "xy": np.zeros((n, len(aa), gh, gw, 2), np.float32),
            "wh": np.zeros((n, len(aa), gh, gw, 2), np.float32),
            "cls": np.full((n, len(aa), gh, gw), -1, np.int64),
        }
    for i, c, x1, y1, x2, y2 in boxes:
        w, h = x2 - x1, y2 - y1
        shape_iou = [
            np.minimum(w, wh[0])
            * np.minimum(h, wh[1])
            / (w * h + wh[0] * wh[1] - np.minimum(w, wh[0]) * np.minimum(h, wh[1]))
            for _, _, wh in anchors
        ]
        head, a, wh = anchors[int(np.argmax(shape_iou))]
        stride = HEADS[head][0]
        gh, gw = sizes[head]
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        gx, gy = min(int(cx), gw - 1), min(int(cy), gh - 1)
        t = out[head]
        t["obj"][int(i), a, gy, gx] = 1
        t["xy"][int(i), a, gy, gx] = (cx - gx, cy - gy)
        t["wh"][int(i), a, gy, gx] = (np.log(w / wh[0]), np.log(h / wh[1]))
        t["cls"][int(i), a, gy, gx] = int(c)
    return out


def yolo_loss(outputs: dict[str, torch.Tensor], targets: dict[str, dict], classes: int) -> torch.Tensor:
    """The YOLOv3 loss of a batch, summed over anchors and cells, averaged over images."""
    total = torch.zeros(())
    for head, out in outputs.items():
        n, _, h, w = out.shape
        a = len(HEADS[head][1])
        p = out.reshape(n, a, 5 + classes, h, w).permute(0, 1, 3, 4, 2)
        t = {k: torch.from_numpy(v) for k, v in targets[head].items()}
        pos = t["obj"] > 0
        total = total + F.binary_cross_entropy_with_logits(p[..., 4], t["obj"], reduction="sum")
        if pos.any():
            total = total + 5 * F.binary_cross_entropy_with_logits(p[..., 0:2][pos], t["xy"][pos], reduction="sum")
            total = total + 5 * F.mse_loss(p[..., 2:4][pos], t["wh"][pos], reduction="sum")
            total = total + F.cross_entropy(p[..., 5:][pos], t["cls"][pos], reduction="sum")
    return total / len(next(iter(outputs.values())))


def train_detector(
    model: nn.Module,
    images: np.ndarray,
    boxes: np.ndarray,
    *,
    epochs: int = EPOCHS,
    lr: float = 3e-3,
    batch: int = 64,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    from carve.pipeline.data.detection import CLASSES

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():  # objectness starts at the prior of a rare object (YOLO's focal-loss-style bias init)
        for conv in (model.head_small, model.head_large):
            conv.bias.view(-1, 5 + CLASSES)[:, 4] = -4.5
    x_all = PREPROCESS.apply(images)
    by_image = [boxes[boxes[:, 0] == i] for i in range(len(images))]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        with torch.no_grad():
            o0, o1 = model(torch.from_numpy(x_all[:2]))
        sizes = {"out0": tuple(o0.shape[2:]), "out1": tuple(o1.shape[2:])}
        for epoch in range(epochs):
            order = rng.permutation(len(images))
            total = 0.0
            for k in range(len(images) // batch):
                sel = order[k * batch : (k + 1) * batch]
                rows = [
                    np.concatenate([np.full((len(by_image[j]), 1), n), by_image[j][:, 1:]], 1)
                    for n, j in enumerate(sel)
                ]
                targets = assign(np.concatenate(rows).reshape(-1, 6), len(sel), CLASSES, sizes)
                out0, out1 = model(torch.from_numpy(x_all[sel]))
                loss = yolo_loss({"out0": out0, "out1": out1}, targets, CLASSES)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                sched.step()
                total += float(loss.detach())
            if log:
                log(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, len(images) // batch):.3f}")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def detector_digits(
    seed: int = 0,
    *,
    epochs: int = EPOCHS,
    use_cache: bool = True,
    log: Callable[[str], None] | None = None,
    score: Callable[[nn.Module], dict] | None = None,
) -> tuple[nn.Module, dict]:
    """The zoo detector trained on ``detect-digits:train``, with ``score(model)``'s figures (``tools/train_zoo.py``
    gives its mAP on ``detect-digits:test``, measured as ``carve eval`` measures it). Cached on disk
    (``$CARVE_CACHE``)."""
    from carve.pipeline.data.detection import builtin

    path = detector_cache_path(seed)
    if use_cache and path.is_file():
        saved = torch.load(path, weights_only=True)
        model = Detector()
        model.load_state_dict(saved["state_dict"])
        return model.eval(), {**saved["metrics"], "cached": True}
    t0 = time.perf_counter()
    images, boxes = builtin("train")
    torch.manual_seed(seed)
    model = train_detector(Detector(), images, boxes, epochs=epochs, seed=seed, log=log)
    metrics = {"epochs": epochs, "seconds": round(time.perf_counter() - t0, 1), **(score(model) if score else {})}
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "metrics": metrics}, tmp)
        os.replace(tmp, path)
    return model.eval(), {**metrics, "cached": False}
