"""A synthetic detection set carve generates: real handwritten digits (scikit-learn's 8 x 8 digits, classes 0..7) scaled
and placed on 64 x 64 canvases of coloured noise, with their boxes. It gives the zoo detector something true to learn
and ``carve eval`` a ground truth to measure detection mAP against, with no download.

Data source names: ``detect-digits:train`` (3,000 canvases drawn with the digits' train split) and
``detect-digits:test`` (500 canvases drawn with the test split: glyphs the training never saw). Boxes are one array of
rows ``(image, class, x1, y1, x2, y2)`` in pixels of the canvas, ``image`` indexing the images (an .npz with the keys
``images`` and ``boxes`` is read the same way)."""

from __future__ import annotations

import numpy as np

from carve.pipeline.errors import CarveError

CLASSES = 8  # digits 0..7: the zoo detector's eight classes
SIZE = 64
SPLITS = {"train": (3000, 11), "test": (500, 12)}  # canvases, seed


def synthetic(
    n: int, *, seed: int = 0, split: str = "train", size: int = SIZE, max_objects: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canvases (N x size x size x 3 uint8) and their boxes (M x 6 float32: image, class, x1, y1, x2, y2)."""
    from carve.pipeline.data.datasets import digits_arrays

    glyphs, labels = digits_arrays(split, seed=0)
    keep = labels < CLASSES
    glyphs, labels = glyphs[keep, ..., 0].astype(np.float32) / 255.0, labels[keep]
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    rows: list[tuple[float, ...]] = []
    for i in range(n):
        canvas = _background(rng, size)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            k = int(rng.integers(len(glyphs)))
            side = int(rng.integers(14, 31))
            glyph = _scale(glyphs[k], side)
            ys, xs = np.nonzero(glyph > 0.2)
            if len(ys) == 0:
                continue
            box = None
            for _attempt in range(10):
                x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
                cand = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
                if all(_iou(cand, p) < 0.1 for p in placed):
                    box = cand
                    break
            if box is None:
                continue
            placed.append(box)
            colour = rng.uniform(0.55, 1.0, 3).astype(np.float32)
            alpha = glyph[..., None]
            region = canvas[y0 : y0 + side, x0 : x0 + side]
            canvas[y0 : y0 + side, x0 : x0 + side] = region * (1 - alpha) + colour * alpha
            rows.append((i, int(labels[k]), *map(float, box)))
        images[i] = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, np.array(rows, np.float32).reshape(-1, 6)


def builtin(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``detect-digits:<split>`` set (fixed size and seed per split)."""
    if split not in SPLITS:
        raise CarveError(f"detect-digits split must be train or test; got {split!r}")
    n, seed = SPLITS[split]
    return synthetic(n, seed=seed, split=split)


def check_boxes(boxes: np.ndarray, images: int, where: str) -> np.ndarray:
    """Boxes as M x 6 float32 rows that index existing images and have positive area, or a clear error."""
    b = np.asarray(boxes, dtype=np.float32)
    if b.ndim != 2 or b.shape[1] != 6:
        raise CarveError(f"{where}: boxes must be rows of (image, class, x1, y1, x2, y2), got shape {list(b.shape)}")
    if len(b) and (b[:, 0].min() < 0 or b[:, 0].max() >= images or (b[:, 0] != np.round(b[:, 0])).any()):
        raise CarveError(f"{where}: a box names an image index outside 0..{images - 1}")
    if len(b) and ((b[:, 4] <= b[:, 2]) | (b[:, 5] <= b[:, 3])).any():
        raise CarveError(f"{where}: a box has x2 <= x1 or y2 <= y1")
    return b


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dark random gradient with noise: the digits must be found, not just thresholded."""
    base = rng.uniform(0.0, 0.35, 3).astype(np.float32)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    tilt = rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    canvas = base + tilt * (ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None])
    canvas = np.broadcast_to(canvas, (size, size, 3)).copy()
    return np.clip(canvas + rng.normal(0, 0.06, (size, size, 3)).astype(np.float32), 0, 1)


def _scale(glyph: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(glyph.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR)
    return np.clip(np.asarray(im), 0, 1)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
