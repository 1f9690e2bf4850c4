"""Calibration and evaluation data: where images come from and how they become model inputs.

Sources (:func:`load_data`):

* ``.npz`` with images (key ``images``, ``x`` or ``data``) and optional labels (``labels`` or ``y``), or ``.npy``
  with images only; NHWC or NCHW, uint8 (scaled to [0, 1]) or float;
* a folder of images with one sub-folder per class (read with Pillow);
* ``digits``, ``digits:train`` or ``digits:test``: scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits,
  shipped inside scikit-learn, so it works on a fresh clone without any download), resized to the model's input;
* a folder of images with no sub-folders: unlabelled images (distillation needs no labels: detectors, segmenters);
* ``detect-digits:train`` / ``detect-digits:test``: carve's synthetic detection set (digits on canvases, with
  boxes: :mod:`carve.pipeline.data.detection`); an ``.npz`` with ``images`` and ``boxes`` rows
  ``(image, class, x1, y1, x2, y2)`` is a detection set too, and ``carve eval`` reports its mAP;
* ``shared:<path>``: a file under the shared data folder (``$CARVE_SHARED``, else ``../shared`` beside the checkout),
  e.g. ``shared:data/cifar10/test.npz``, so recipes need no machine-specific path.

Data given for a model must fit it: images whose channel count differs from the model's input are refused (carve does
not invent or drop colour channels: 8x8 grey digits are not CIFAR images), images of another size are resized with a
warning (``digits`` is documented to be resized: no warning), and NaN or Inf values are refused.

Preprocessing is a small spec (:class:`Preprocess`: resize, scale, mean/std, channels) saved into reports. Its default
comes from the model's ``carve.preprocess`` metadata (written by ``carve export``) and its input shape. Sampling is
deterministic for a seed and class-balanced when labels exist (the shared CIFAR arrays are stored class by class:
never take the first N).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from carve.pipeline.errors import CarveError, warn
from carve.pipeline.graph.model import Model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Preprocess:
    """How raw images become model inputs: NCHW float32 of ``size``, scaled, normalised."""

    size: tuple[int, int] | None = None  # (H, W); None keeps the source size
    channels: int | None = None  # 1 or 3; None keeps the source channels
    scale: float | None = None  # None: 1/255 for uint8 sources, 1 for float sources
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("size", "mean", "std"):
            if k in known and known[k] is not None:
                known[k] = tuple(known[k])
        return cls(**known)

    @classmethod
    def for_model(cls, model: Model | None) -> Preprocess:
        """Defaults from the model: its ``carve.preprocess`` metadata, else its input shape."""
        p = cls()
        if model is None:
            return p
        meta = model.metadata().get("carve.preprocess")
        if meta:
            try:
                d = json.loads(meta)
            except json.JSONDecodeError:
                d = {}
            p = cls.from_dict(d)
        name = model.input_names[0] if model.input_names else None
        shp = model.shape(name) if name else None
        if shp is not None and len(shp) == 4:
            if p.size is None and shp[2] and shp[3]:
                p.size = (int(shp[2]), int(shp[3]))
            if p.channels is None and shp[1]:
                p.channels = int(shp[1])
        return p

    def apply(self, images: np.ndarray) -> np.ndarray:
        """``images``: N x H x W x C or N x C x H x W (uint8 or float) -> N x C x H x W float32."""
        x = _to_nchw(images)
        scale = self.scale if self.scale is not None else (1 / 255 if images.dtype == np.uint8 else 1.0)
        x = x.astype(np.float32) * np.float32(scale)
        if self.channels is not None and x.shape[1] != self.channels:
            if self.channels == 1 and x.shape[1] == 3:  # colour to grey
                x = x.mean(axis=1, keepdims=True)
            elif x.shape[1] == 1:  # grey to colour
                x = np.repeat(x, self.channels, axis=1)
            else:
                raise CarveError(
                    f"cannot turn {x.shape[1]}-channel images into the {self.channels} channels the model takes",
                    hint="give images with the model's channel count (grey and RGB convert into each other)",
                )
        if self.size is not None and tuple(x.shape[2:]) != tuple(self.size):
            x = resize(x, self.size)
        c = x.shape[1]
        mean = np.asarray(self.mean if len(self.mean) in (1, c) else self.mean[:1], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std if len(self.std) in (1, c) else self.std[:1], np.float32).reshape(1, -1, 1, 1)
        return ((x - mean) / std).astype(np.float32)


def _to_nchw(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:  # N x H x W grayscale
        return images[:, None]
    if images.ndim != 4:
        raise CarveError(f"images must be N x H x W x C or N x C x H x W, got shape {images.shape}")
    if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        x = np.transpose(images, (0, 3, 1, 2))
        return x[:, :3] if x.shape[1] == 4 else x
    return images


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an N x C x H x W float batch (antialiased when shrinking)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    shrink = size[0] < x.shape[2] or size[1] < x.shape[3]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink).numpy()


@dataclass
class Dataset:
    """Raw images (as stored) with optional labels; preprocessed batch by batch."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    preprocess: Preprocess = field(default_factory=Preprocess)
    indices: np.ndarray | None = None  # the sample actually used
    boxes: np.ndarray | None = None  # detection ground truth: rows (image, class, x1, y1, x2, y2) over ``images``

    def __len__(self) -> int:
        return len(self.images) if self.indices is None else len(self.indices)

    def _idx(self) -> np.ndarray:
        return np.arange(len(self.images)) if self.indices is None else self.indices

    def sample(self, n: int | None, seed: int = 0) -> Dataset:
        """``n`` samples, deterministic for ``seed``, balanced over classes when labels exist."""
        idx = self._idx()
        if n is None or n >= len(idx):
            order = np.random.default_rng(seed).permutation(len(idx))
            return replace(self, indices=idx[order])
        rng = np.random.default_rng(seed)
        if self.labels is None:
            pick = rng.choice(len(idx), size=n, replace=False)
        else:
            labels = self.labels[idx]
            classes = np.unique(labels)
            per = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
            # round-robin over classes: balanced, and every prefix of the order is balanced too
            order = [p[k] for k in range(max(len(p) for p in per)) for p in per if k < len(p)]
            pick = np.array(order[:n])
        return replace(self, indices=idx[np.sort(pick)])

    def batches(self, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        idx = self._idx()
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            x = self.preprocess.apply(self.images[sel])
            y = None if self.labels is None else self.labels[sel].astype(np.int64)
            yield x, y

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The preprocessed samples at ``positions`` of this dataset's sample (and their labels)."""
        sel = self._idx()[np.asarray(positions, dtype=np.int64)]
        x = self.preprocess.apply(self.images[sel])
        return x, None if self.labels is None else self.labels[sel].astype(np.int64)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        xs, ys = zip(*self.batches(256)) if len(self) else ((), ())
        x = np.concatenate(xs) if xs else np.zeros((0,))
        y = None if self.labels is None else np.concatenate(ys)
        return x, y

    def describe(self) -> dict:
        return {
            "name": self.name,
            "samples": len(self),
            "labelled": self.labels is not None or self.boxes is not None,
            "preprocess": self.preprocess.to_dict(),
        }


def digits_arrays(split: str = "all", seed: int = 0, test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (N x 8 x 8 x 1, 0..255) and labels; stratified seeded split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255 / 16)), 0, 255).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int64)
    if split == "all":
        return images, labels
    if split not in ("train", "test"):
        raise CarveError(f"digits split must be train, test or all; got {split!r}")
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test[members[: int(round(test_fraction * len(members)))]] = True
    sel = test if split == "test" else ~test
    return images[sel], labels[sel]


def load_data(
    source: str | Path,
    *,
    model: Model | None = None,
    preprocess: Preprocess | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a data source (see the module docstring), with preprocessing defaults from ``model``."""
    pre = preprocess or Preprocess.for_model(model)
    text = str(source)
    if text.startswith("shared:"):
        from carve.pipeline.data.shared import missing_reason, shared_file

        parts = [p for p in text[len("shared:") :].split("/") if p]
        found = shared_file(*parts)
        if found is None:
            raise CarveError(f"{text}: {missing_reason(*parts)}", hint="set $CARVE_SHARED to the shared data folder")
        source, text = found, str(found)
    if text == "digits" or text.startswith("digits:"):
        split = text.split(":", 1)[1] if ":" in text else "all"
        images, labels = digits_arrays(split, seed=0)
        ds = Dataset(images, labels, text, pre)
    elif text.startswith("detect-digits:"):
        from carve.pipeline.data.detection import builtin

        images, boxes = builtin(text.split(":", 1)[1])
        ds = Dataset(images, None, text, pre, boxes=boxes)
    else:
        path = Path(source)
        if not path.exists():
            raise CarveError(
                f"{path}: no such data file or folder",
                hint="give an .npz/.npy file, a folder of class sub-folders, or `digits`",
            )
        if path.is_dir():
            ds = _load_folder(path, pre)
        elif path.suffix == ".npz":
            ds = _load_npz(path, pre)
        elif path.suffix == ".npy":
            images = _np_load(path)
            if not isinstance(images, np.ndarray):
                raise CarveError(f"{path}: not a single .npy array")
            _check_arrays(images, None, path)
            ds = Dataset(images, None, str(path), pre)
        else:
            raise CarveError(f"{path}: unknown data format {path.suffix!r}", hint="use .npz, .npy or a folder")
    if len(ds) == 0:
        raise CarveError(f"{source}: holds no images")
    _check_values(ds, text)
    if model is not None:
        _check_fit(ds, pre, text, builtin=text == "digits" or text.startswith(("digits:", "detect-digits:")))
    return ds.sample(samples, seed)


def _geometry(images: np.ndarray) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of stored images, in the layouts :meth:`Preprocess.apply` reads."""
    x = _to_nchw(images[:1])
    return int(x.shape[1]), (int(x.shape[2]), int(x.shape[3]))


def _check_values(ds: Dataset, where: str) -> None:
    if not np.issubdtype(ds.images.dtype, np.number) or np.issubdtype(ds.images.dtype, np.complexfloating):
        raise CarveError(f"{where}: images must be numbers (uint8 or float), not {ds.images.dtype}")
    if np.issubdtype(ds.images.dtype, np.floating) and not np.isfinite(ds.images).all():
        bad = int((~np.isfinite(ds.images)).reshape(len(ds.images), -1).any(axis=1).sum())
        raise CarveError(
            f"{where}: {bad} image(s) hold NaN or Inf values", hint="clean the data (carve never feeds them)"
        )
    if ds.images.dtype.itemsize > 4 and np.issubdtype(ds.images.dtype, np.floating):
        # models compute in float32: a float64 pixel beyond its range becomes Inf on the way in
        big = float(np.abs(ds.images).max(initial=0.0))
        if big > float(np.finfo(np.float32).max):
            raise CarveError(
                f"{where}: pixel values up to {big:.3g} overflow float32 (the models' precision)",
                hint="scale the images to 0..255 or 0..1 before saving them",
            )


def _check_fit(ds: Dataset, pre: Preprocess, where: str, *, builtin: bool) -> None:
    """The data fits the model: the same channel count; another size is resized, and said so."""
    channels, size = _geometry(ds.images)
    if pre.channels is not None and channels != pre.channels:
        raise CarveError(
            f"{where}: {channels}-channel {size[0]}x{size[1]} images do not fit the model's "
            f"{pre.channels}-channel input",
            hint=f"give {pre.channels}-channel images (carve does not invent or drop colour channels)",
        )
    if pre.size is not None and tuple(size) != tuple(pre.size) and not builtin:
        warn(f"{where}: {size[0]}x{size[1]} images are resized to the model's {pre.size[0]}x{pre.size[1]} input")


def _np_load(path: Path):
    """A numpy file read as data only: pickled objects (which can run code as they load) are refused (issue 21)."""
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CarveError(f"{path}: not a readable numpy file, or not data only ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    """One array of an .npz, read as data only (the archive is lazy: an object array fails here, not at open)."""
    try:
        return z[key]
    except Exception as exc:
        raise CarveError(f"{path}: array {key!r} is not readable as data only ({_first_line(exc)})") from None


def _check_arrays(images: np.ndarray, labels: np.ndarray | None, path: Path) -> np.ndarray | None:
    """The schema of a data file, at the door: numeric N x H x W (x C) images with a non-empty picture, and
    integer labels, one per image. Returns the labels as int64."""
    kind = images.dtype.kind
    if kind not in "biuf":
        raise CarveError(f"{path}: images must be numbers (uint8 or float), not {images.dtype}")
    if images.ndim not in (3, 4):
        raise CarveError(
            f"{path}: images must be N x H x W (grey), N x H x W x C or N x C x H x W; got shape {images.shape}",
            hint="a single image is an array of shape 1 x H x W (x C)",
        )
    if 0 in images.shape[1:]:
        raise CarveError(f"{path}: images of shape {images.shape[1:]} hold no pixels")
    if labels is None:
        return None
    if labels.dtype.kind not in "biuf":
        raise CarveError(
            f"{path}: labels must be class numbers (integers), not {labels.dtype}",
            hint="map class names to 0, 1, 2, ... before saving",
        )
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise CarveError(f"{path}: labels must be whole class numbers; found fractions, NaN or Inf")
    return labels.astype(np.int64).reshape(-1)


def _load_npz(path: Path, pre: Preprocess) -> Dataset:
    z = _np_load(path)
    if not hasattr(z, "files"):
        raise CarveError(f"{path}: not an .npz archive (a single array saved under an .npz name?)")
    keys = set(z.files)
    img_key = next((k for k in ("images", "x", "data", "inputs") if k in keys), None)
    if img_key is None:
        raise CarveError(f"{path}: no image array (expected a key named images, x or data; found {sorted(keys)})")
    lab_key = next((k for k in ("labels", "y", "targets") if k in keys), None)
    images = _npz_array(z, img_key, path)
    if "boxes" in keys:  # a detection set: ground-truth boxes instead of class labels
        from carve.pipeline.data.detection import check_boxes

        _check_arrays(images, None, path)
        boxes = check_boxes(_npz_array(z, "boxes", path), len(images), str(path))
        return Dataset(images, None, str(path), pre, boxes=boxes)
    labels = _check_arrays(images, _npz_array(z, lab_key, path) if lab_key else None, path)
    if labels is not None and len(labels) != len(images):
        raise CarveError(f"{path}: {len(images)} images but {len(labels)} labels")
    return Dataset(images, labels, str(path), pre)


def _load_folder(path: Path, pre: Preprocess) -> Dataset:
    from PIL import Image

    classes = sorted(p for p in path.iterdir() if p.is_dir())
    files: list[tuple[Path, int]] = []
    if classes:
        for k, c in enumerate(classes):
            files += [(f, k) for f in sorted(c.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        labelled = True
    else:
        files = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        labelled = False
    if not files:
        raise CarveError(f"{path}: no images found (one sub-folder per class, or images directly in it)")
    size = pre.size
    mode = "L" if pre.channels == 1 else "RGB"
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
        except Exception as exc:
            raise CarveError(f"{f}: not a readable image ({exc})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CarveError(f"{path}: images have different sizes {sorted(shapes)[:3]}; give the model (or a size)")
    images = np.stack(arrays)
    labels = np.array([k for _, k in files], dtype=np.int64) if labelled else None
    return Dataset(images, labels, str(path), pre)
