"""Detection accuracy against ground truth: decoding a detector's raw heads into boxes, non-maximum suppression, and
mean average precision (what ``carve eval`` reports on a detection set).

The model says how to read its heads in its ``carve.detection`` metadata (written by ``carve export`` for the zoo
detector)::

    {"format": "yolo-anchors", "classes": 8,
     "heads": {"out0": {"stride": 4, "anchors": [[w, h], ...]}, "out1": {"stride": 8, "anchors": [...]}}}

``yolo-anchors`` is the YOLOv2/v3 layout (Redmon and Farhadi, "YOLO9000", CVPR 2017; "YOLOv3", 2018): a head is
N x A(5 + C) x H x W, per anchor (tx, ty, tw, th, objectness, C class logits); the box centre is
((x + sigmoid(tx)) stride, (y + sigmoid(ty)) stride), its size anchor x exp(t), its score sigmoid(obj) x softmax(class).

Average precision is the all-point interpolated area under the precision/recall curve per class (PASCAL VOC 2010 and
later, as COCO computes it at a single IoU threshold), averaged over the classes that occur in the ground truth:
``map50`` at IoU 0.5 and ``map50_95`` averaged over IoU 0.5, 0.55, ..., 0.95 (COCO's headline metric).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from carve.pipeline.errors import CarveError

IOUS = np.round(np.arange(0.5, 0.96, 0.05), 2)


def detection_meta(model) -> dict[str, Any] | None:
    """The model's ``carve.detection`` metadata, checked against its outputs; None when it has none."""
    text = model.metadata().get("carve.detection")
    if not text:
        return None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise CarveError(f"{model.source or 'the model'}: carve.detection metadata is not JSON") from None
    if meta.get("format") != "yolo-anchors":
        raise CarveError(f"carve.detection format {meta.get('format')!r} is not one carve decodes (yolo-anchors)")
    for head in meta["heads"]:
        if head not in model.output_names:
            raise CarveError(f"carve.detection names head {head!r}, but the model has no such output")
    return meta


def decode(outputs: dict[str, np.ndarray], meta: dict[str, Any], *, conf: float = 0.01) -> list[np.ndarray]:
    """Boxes per image: K x 6 rows (x1, y1, x2, y2, score, class) with score >= ``conf``, before NMS."""
    classes = int(meta["classes"])
    per_image: list[list[np.ndarray]] = []
    for head, spec in meta["heads"].items():
        out = outputs[head].astype(np.float32)
        n, _, h, w = out.shape
        anchors = np.asarray(spec["anchors"], np.float32)
        a = len(anchors)
        if out.shape[1] != a * (5 + classes):
            raise CarveError(f"{head}: {out.shape[1]} channels, the metadata says {a} x (5 + {classes})")
        p = out.reshape(n, a, 5 + classes, h, w).transpose(0, 1, 3, 4, 2)  # N A H W (5 + C)
        gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        stride = float(spec["stride"])
        cx = (gx + _sigmoid(p[..., 0])) * stride
        cy = (gy + _sigmoid(p[..., 1])) * stride
        bw = anchors[:, 0].reshape(1, a, 1, 1) * np.exp(np.clip(p[..., 2], -8, 8))
        bh = anchors[:, 1].reshape(1, a, 1, 1) * np.exp(np.clip(p[..., 3], -8, 8))
        logits = p[..., 5:] - p[..., 5:].max(-1, keepdims=True)
        prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        cls = prob.argmax(-1)
        score = _sigmoid(p[..., 4]) * prob.max(-1)
        for i in range(n):
            keep = score[i] >= conf
            rows = np.stack(
                [
                    cx[i][keep] - bw[i][keep] / 2,
                    cy[i][keep] - bh[i][keep] / 2,
                    cx[i][keep] + bw[i][keep] / 2,
                    cy[i][keep] + bh[i][keep] / 2,
                    score[i][keep],
                    cls[i][keep].astype(np.float32),
                ],
                axis=1,
            )
            if len(per_image) <= i:
                per_image.append([])
            per_image[i].append(rows)
    return [np.concatenate(r) if r else np.zeros((0, 6), np.float32) for r in per_image]


def nms(dets: np.ndarray, iou: float = 0.5, top: int = 100) -> np.ndarray:
    """Greedy per-class non-maximum suppression of K x 6 rows (x1, y1, x2, y2, score, class); the ``top`` best."""
    order = np.argsort(-dets[:, 4], kind="stable")
    dets = dets[order]
    keep: list[int] = []
    suppressed = np.zeros(len(dets), dtype=bool)
    for k in range(len(dets)):
        if suppressed[k]:
            continue
        keep.append(k)
        if len(keep) >= top:
            break
        same = dets[:, 5] == dets[k, 5]
        suppressed |= same & (box_iou(dets[k, :4], dets[:, :4]) > iou)
    return dets[keep]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (x1, y1, x2, y2) with each row of ``boxes``."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated area under the precision/recall curve."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[1.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    step = np.flatnonzero(r[1:] != r[:-1])
    return float(((r[step + 1] - r[step]) * p[step + 1]).sum())


def mean_ap(detections: list[np.ndarray], truth: np.ndarray, classes: int) -> dict[str, Any]:
    """mAP of ``detections`` (per image, rows x1, y1, x2, y2, score, class) against ``truth`` (rows image, class, x1,
    y1, x2, y2; image = position in ``detections``): ``map50``, ``map50_95`` and AP50 per class."""
    aps = np.full((len(IOUS), classes), np.nan)
    for c in range(classes):
        gt = truth[truth[:, 1] == c]
        if len(gt) == 0:
            continue
        dets = [(i, d) for i, per in enumerate(detections) for d in per[per[:, 5] == c]]
        dets.sort(key=lambda t: -t[1][4])
        by_image = {int(i): gt[gt[:, 0] == i, 2:6] for i in np.unique(gt[:, 0])}
        for t, thr in enumerate(IOUS):
            used = {i: np.zeros(len(b), dtype=bool) for i, b in by_image.items()}
            tp = np.zeros(len(dets))
            for k, (i, d) in enumerate(dets):
                boxes = by_image.get(i)
                if boxes is None:
                    continue
                ious = box_iou(d[:4], boxes)
                ious[used[i]] = -1
                j = int(ious.argmax())
                if ious[j] >= thr:
                    used[i][j] = True
                    tp[k] = 1
            ctp = np.cumsum(tp)
            recall = ctp / len(gt)
            precision = ctp / np.arange(1, len(dets) + 1)
            aps[t, c] = average_precision(recall, precision) if len(dets) else 0.0
    present = ~np.isnan(aps[0])
    if not present.any():
        raise CarveError("the ground truth holds no boxes: nothing to measure mAP against")
    return {
        "map50": float(aps[0, present].mean()),
        "map50_95": float(aps[:, present].mean()),
        "ap50_per_class": {int(c): round(float(aps[0, c]), 4) for c in np.flatnonzero(present)},
        "boxes": int(len(truth)),
    }


def evaluate_detection(model, data, *, threads: int = 2, conf: float = 0.01) -> dict[str, Any]:
    """The ``detection`` section of ``carve eval`` for ``model`` on a dataset with ``boxes``: its mAP."""
    from carve.pipeline.runtime.ort import session

    meta = detection_meta(model)
    if meta is None:
        raise CarveError(
            f"{data.name}: a detection set, but {model.source or 'the model'} has no carve.detection metadata saying "
            "how to decode its outputs",
            hint="export the zoo detector with `carve export detector`, or add the metadata (docs/finetune.md)",
        )
    idx = data._idx()
    truth = data.boxes
    sess = session(model, threads=threads)
    name = model.input_names[0]
    heads = list(meta["heads"])
    dets: list[np.ndarray] = []
    for x, _ in data.batches(64):
        outs = dict(zip(heads, sess.run(heads, {name: x})))
        dets += [nms(d) for d in decode(outs, meta, conf=conf)]
    # ground truth of the sampled images, renumbered by their position in the sample
    position = {int(i): k for k, i in enumerate(idx)}
    rows = [r for r in truth if int(r[0]) in position]
    gt = np.array([[position[int(r[0])], *r[1:]] for r in rows], np.float32).reshape(-1, 6)
    _check_scale(gt, data)
    return {**mean_ap(dets, gt, int(meta["classes"])), "conf": conf, "nms_iou": 0.5}


def _check_scale(gt: np.ndarray, data) -> None:
    """Boxes are in pixels of the images as stored; a resize to the model's input would move them."""
    size = data.preprocess.size
    h, w = data.images.shape[1:3] if data.images.shape[-1] in (1, 3) else data.images.shape[2:4]
    if size is not None and tuple(size) != (h, w):
        raise CarveError(
            f"{data.name}: {h}x{w} images with boxes, the model takes {size[0]}x{size[1]}",
            hint="give a detection set at the model's input size (boxes are not rescaled)",
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))
