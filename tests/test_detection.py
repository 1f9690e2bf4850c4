"""Detection accuracy: carve's synthetic digit-detection set (deterministic, boxes inside the canvas around the ink),
YOLO-anchor targets decode back to the very boxes they encode, mAP (1 for the truth, lower for shifted or missing
boxes, per-class NMS), detection sets from .npz with checked boxes, ``carve eval`` reporting mAP for a model and its
reference, and the zoo's cache-trained weights (ViT, detector) found or reported missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import carve as P
from carve import models
from carve.models.detector import HEADS
from carve.models.train_detector import assign
from carve.pipeline.cli import main
from carve.pipeline.data.detection import CLASSES, synthetic
from carve.pipeline.errors import CarveError
from carve.pipeline.measure.detection import average_precision, decode, mean_ap, nms

META = {
    "format": "yolo-anchors",
    "classes": CLASSES,
    "heads": {h: {"stride": s, "anchors": a} for h, (s, a) in HEADS.items()},
}


def test_the_synthetic_set_is_deterministic_and_its_boxes_hold_the_digits():
    images, boxes = synthetic(40, seed=7)
    again, boxes2 = synthetic(40, seed=7)
    assert np.array_equal(images, again) and np.array_equal(boxes, boxes2)
    assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
    assert set(np.unique(boxes[:, 0]).astype(int)) == set(range(40))  # every canvas holds at least one digit
    assert boxes[:, 1].min() >= 0 and boxes[:, 1].max() < CLASSES
    assert (boxes[:, 2:] >= 0).all() and (boxes[:, 2:] <= 64).all()
    for i, _, x1, y1, x2, y2 in boxes[:10]:  # the ink is inside the box and brighter than the background around it
        im = images[int(i)].astype(float).mean(-1)
        inside = im[int(y1) : int(y2), int(x1) : int(x2)].max()
        assert inside > np.median(im) + 40
    other, _ = synthetic(40, seed=8)
    assert not np.array_equal(images, other)


def _encode(boxes: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Raw head outputs that say exactly ``boxes`` (confident, right class), the inverse of decoding."""
    sizes = {"out0": (16, 16), "out1": (8, 8)}
    targets = assign(boxes, n, CLASSES, sizes)
    outs = {}
    for head, (_, anchors) in HEADS.items():
        t, a = targets[head], len(anchors)
        p = np.zeros((n, a, *sizes[head], 5 + CLASSES), np.float32)
        xy = np.clip(t["xy"], 1e-4, 1 - 1e-4)
        p[..., 0:2], p[..., 2:4] = np.log(xy / (1 - xy)), t["wh"]
        p[..., 4] = np.where(t["obj"] > 0, 10.0, -10.0)
        np.put_along_axis(p[..., 5:], np.maximum(t["cls"], 0)[..., None], 10.0, axis=-1)
        outs[head] = p.transpose(0, 1, 4, 2, 3).reshape(n, a * (5 + CLASSES), *sizes[head])
    return outs


def test_targets_decode_back_to_the_boxes_and_map_is_one_for_the_truth():
    _, boxes = synthetic(30, seed=1)
    dets = [nms(d) for d in decode(_encode(boxes, 30), META)]
    assert sum(len(d) for d in dets) == len(boxes)
    got = np.concatenate([np.c_[np.full(len(d), i), d[:, 5], d[:, :4]] for i, d in enumerate(dets)])
    order = lambda b: b[np.lexsort((b[:, 2], b[:, 0]))]  # noqa: E731
    assert np.allclose(order(got), order(boxes), atol=1e-2)
    m = mean_ap(dets, boxes, CLASSES)
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)


def test_map_falls_with_shifted_missing_and_wrong_boxes():
    _, boxes = synthetic(30, seed=2)
    truth = [
        np.c_[boxes[boxes[:, 0] == i][:, 2:], np.ones(int((boxes[:, 0] == i).sum())), boxes[boxes[:, 0] == i][:, 1]]
        for i in range(30)
    ]
    shifted = [d + np.array([3, 3, 3, 3, 0, 0], np.float32) for d in truth]
    half = [d[: max(0, len(d) - 1)] for d in truth]
    wrong = [np.c_[d[:, :5], (d[:, 5] + 1) % CLASSES] for d in truth]
    full = mean_ap(truth, boxes, CLASSES)
    assert full["map50"] == pytest.approx(1.0)
    assert mean_ap(shifted, boxes, CLASSES)["map50_95"] < 0.9 * full["map50_95"]
    assert mean_ap(half, boxes, CLASSES)["map50"] < 0.8
    assert mean_ap(wrong, boxes, CLASSES)["map50"] == pytest.approx(0.0)
    with pytest.raises(CarveError, match="no boxes"):
        mean_ap(truth, np.zeros((0, 6), np.float32), CLASSES)


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class_only():
    d = np.array([[0, 0, 10, 10, 0.9, 1], [1, 1, 11, 11, 0.8, 1], [1, 1, 11, 11, 0.7, 2], [30, 30, 40, 40, 0.6, 1]])
    kept = nms(d.astype(np.float32))
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)


def test_npz_detection_sets_and_bad_boxes(tmp_path):
    images, boxes = synthetic(12, seed=3)
    np.savez(tmp_path / "det.npz", images=images, boxes=boxes)
    ds = P.load_data(str(tmp_path / "det.npz"), samples=6)
    assert ds.boxes is not None and len(ds) == 6 and ds.describe()["labelled"]
    bad = boxes.copy()
    bad[0, 0] = 12
    np.savez(tmp_path / "bad.npz", images=images, boxes=bad)
    with pytest.raises(CarveError, match="image index outside 0..11"):
        P.load_data(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "flat.npz", images=images, boxes=boxes[:, :4])
    with pytest.raises(CarveError, match=r"rows of \(image, class, x1, y1, x2, y2\)"):
        P.load_data(str(tmp_path / "flat.npz"))


@pytest.fixture(scope="module")
def trained_detector(tmp_path_factory):
    from carve.models.detector import Detector
    from carve.models.train_detector import train_detector

    d = tmp_path_factory.mktemp("evaldet")
    images, boxes = synthetic(256, seed=4)
    torch.save(train_detector(Detector(), images, boxes, epochs=2, batch=32).state_dict(), d / "det.pt")
    models.export("detector", d / "det.onnx", weights=str(d / "det.pt"))
    return d / "det.onnx"


def test_carve_eval_reports_detection_map(trained_detector, tmp_path, capsys):
    images, boxes = synthetic(60, seed=21, split="test")
    np.savez(tmp_path / "test.npz", images=images, boxes=boxes)
    args = ["eval", str(trained_detector), "--data", str(tmp_path / "test.npz"), "--reference", str(trained_detector)]
    assert main([*args, "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    det = acc["detection"]
    assert 0 <= det["map50_95"] <= det["map50"] <= 1 and det["boxes"] == len(boxes)
    assert acc["reference"]["detection"]["map50"] == det["map50"]  # the same model
    assert main([*args, "-o", str(tmp_path / "eval.json")]) == 0
    assert "mAP@0.5" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "eval.json"), "-o", str(tmp_path / "eval.md")]) == 0
    assert f"mAP@0.5 {det['map50']:.2%}" in (tmp_path / "eval.md").read_text()


def test_eval_of_a_detection_set_needs_the_decoding_metadata(tmp_path, capsys):
    models.export("unet", tmp_path / "unet.onnx")
    images, boxes = synthetic(8, seed=1)
    np.savez(tmp_path / "d.npz", images=images, boxes=boxes)
    assert main(["eval", str(tmp_path / "unet.onnx"), "--data", str(tmp_path / "d.npz")]) != 0
    assert "no carve.detection metadata" in capsys.readouterr().err


def test_cache_trained_zoo_weights_are_found_or_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVE_CACHE", str(tmp_path))
    info = models.export("vit", tmp_path / "v.onnx")
    assert info.weights == "random" and any("tools/train_zoo.py vit" in w for w in info.warnings)
    assert not models.has_trained_weights("vit")
    from carve.models.train import vit_cache_path

    net = models.build("vit", weights="random")
    torch.save({"state_dict": net.state_dict(), "metrics": {"test_acc": 0.5}}, vit_cache_path())
    assert models.has_trained_weights("vit")
    info = models.export("vit", tmp_path / "v2.onnx")
    assert info.weights.startswith("trained: vit-cifar10") and "0.500" in info.weights
    meta = P.load(tmp_path / "v2.onnx").metadata()
    assert "carve.detection" not in meta
    det = P.load(models.export("detector", tmp_path / "d.onnx", weights="random").path).metadata()
    assert json.loads(det["carve.detection"])["heads"]["out1"]["stride"] == 8
    assert json.loads(det["carve.outputs"]) == {"out0": "regression", "out1": "regression"}


def test_the_readme_accuracy_commands_run_as_written(trained_detector, tmp_path, monkeypatch):
    """The README's ViT/detector block: the training line is replaced by the quickly trained detector put in the
    cache, the image folder is made here, and the fine-tune runs one epoch instead of ten."""
    import re
    import shlex

    from conftest import REPO
    from PIL import Image

    from carve.models.train import CACHED

    monkeypatch.setenv("CARVE_CACHE", str(tmp_path / "cache"))
    path = CACHED["detector-digits"]()
    path.parent.mkdir(parents=True)
    net = models.build("detector", weights=str(trained_detector.with_suffix(".pt")))
    torch.save({"state_dict": net.state_dict(), "metrics": {"test_map50": 0.1}}, path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "canvases").mkdir()
    for k, im in enumerate(synthetic(64, seed=5)[0]):
        Image.fromarray(im).save(tmp_path / "canvases" / f"{k}.png")
    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S) if "train_zoo" in b
    )
    lines = [ln.split("  #")[0] for ln in block.splitlines() if ln.strip()]
    assert lines[0].startswith("python tools/train_zoo.py vit detector")
    for line in lines[1:]:
        args = shlex.split(line.replace("--epochs 10", "--epochs 1"))
        assert args[0] == "carve" and main(args[1:]) == 0, line
    assert "finetune" in P.load(tmp_path / "det_ft.onnx").metadata()["carve.history"]
