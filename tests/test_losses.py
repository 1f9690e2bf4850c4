"""Distillation beyond class logits: what each output is (metadata, op, name, shape), the loss it gets, each loss's
properties (zero at the teacher, scale handling, gradients towards the teacher), per-output overrides (API, CLI,
recipe mapping) with clear errors, and a label-free fine-tune of the zoo detector from a folder of unlabelled images."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import TensorProto, helper

import carve as P
from carve.pipeline.cli import main
from carve.pipeline.config import from_mapping
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.training import losses
from carve.pipeline.training.finetune import FinetuneOptions, finetune


def graph(outputs: dict[str, list], nodes=(), meta: dict[str, str] | None = None) -> Model:
    """A model whose input ``x`` (N x 8) feeds the given ``nodes``; ``outputs`` name -> shape (after N)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *s]) for n, s in outputs.items()]
    nodes = list(nodes) or [helper.make_node("Identity", ["x"], [n]) for n in outputs]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 17)])
    for k, v in (meta or {}).items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    return Model(proto)


@pytest.mark.parametrize(
    ("name", "shape", "kind"),
    [
        ("logits", [10], "logits"),
        ("output", [10], "logits"),  # N x C: one score per class
        ("y", [4, 16, 16], "dense"),  # N x C x H x W
        ("y", [1, 16, 16], "regression"),  # one channel: a map of values, not a distribution
        ("y", [84, 8400], "regression"),  # YOLOv8's raw detections
        ("pred_boxes", [100, 4], "regression"),
        ("bbox_regression", [10], "regression"),  # the name wins over the N x C shape
        ("masks", [4, 16, 16], "dense"),
        ("last_hidden_state", [8, 24], "embedding"),
        ("pooler_output", [24], "embedding"),
        ("block_out", [10], "logits"),  # "loc" inside "block" is not a word of the name
    ],
)
def test_output_kind_from_name_and_shape(name, shape, kind):
    assert losses.output_kind(graph({name: shape}), name)[0] == kind


def test_output_kind_from_metadata_and_normalisation():
    declared = graph({"out0": [39, 8, 8]}, meta={"carve.outputs": json.dumps({"out0": "regression"})})
    assert losses.output_kind(declared, "out0") == ("regression", "declared in the model's carve.outputs metadata")
    lp = graph({"e": [8]}, [helper.make_node("LpNormalization", ["x"], ["e"], axis=1, p=2)])
    assert losses.output_kind(lp, "e")[0] == "embedding"
    div = graph(
        {"e": [8]},
        [
            helper.make_node("ReduceL2", ["x"], ["n"], axes=[1], keepdims=1),
            helper.make_node("Div", ["x", "n"], ["e"]),
        ],
    )
    assert losses.output_kind(div, "e") == ("embedding", "divided by its norm")
    plain_div = graph({"e": [8]}, [helper.make_node("Div", ["x", "x"], ["e"])])
    assert losses.output_kind(plain_div, "e")[0] == "logits"  # a Div by anything else is not a normalisation


def test_a_head_the_detection_metadata_describes_gets_the_yolo_loss():
    det = {"format": "yolo-anchors", "classes": 2, "heads": {"p3": {"stride": 8, "anchors": [[8, 8], [16, 16]]}}}
    m = graph({"p3": [14, 4, 4], "aux": [14, 4, 4]}, meta={"carve.detection": json.dumps(det)})
    assert losses.output_kind(m, "p3") == ("detection", "a YOLO head (carve.detection metadata)")
    plan = {p.output: p for p in losses.output_losses(m, m)}
    assert plan["p3"].loss == "yolo" and plan["p3"].params == {"anchors": 2, "classes": 2}
    assert plan["aux"].loss == "channel-kl"
    with pytest.raises(CarveError, match="aux=yolo: the model's carve.detection metadata does not describe 'aux'"):
        losses.output_losses(m, m, {"aux": "yolo"})


def test_the_yolo_loss_weighs_boxes_and_classes_by_the_teachers_objectness():
    g = torch.Generator().manual_seed(3)
    a, c = 2, 3
    teacher = torch.randn(4, a * (5 + c), 5, 5, generator=g)
    t = teacher.reshape(4, a, 5 + c, 5, 5)
    t[:, :, 4] = -12.0  # nothing anywhere ...
    t[0, 1, 4, 2, 3] = 6.0  # ... but one confident object
    kw = {"anchors": a, "classes": c}
    assert float(losses.distil("yolo", teacher.clone(), teacher, 2.0, **kw)) == pytest.approx(0.0, abs=1e-5)
    off = teacher.clone().reshape(4, a, 5 + c, 5, 5)
    off[:, :, :4] += 1.0  # every box moves: only the one where the teacher sees an object counts
    off[0, 1, :4, 2, 3] -= 1.0
    assert float(losses.distil("yolo", off.reshape_as(teacher), teacher, 2.0, **kw)) < 0.01
    off[0, 1, :4, 2, 3] += 1.0
    assert float(losses.distil("yolo", off.reshape_as(teacher), teacher, 2.0, **kw)) > 0.1
    student = (teacher + torch.randn(teacher.shape, generator=g)).requires_grad_(True)
    value = losses.distil("yolo", student, teacher, 2.0, **kw)
    value.backward()
    stepped = (student - 0.05 * student.grad / student.grad.norm()).detach()
    assert float(losses.distil("yolo", stepped, teacher, 2.0, **kw)) < float(value.detach())


def test_output_losses_plan_and_overrides():
    m = graph({"logits": [10], "boxes": [5, 4]})
    plan = losses.output_losses(m, m)
    assert [(p.output, p.loss, p.kind) for p in plan] == [
        ("logits", "kl", "logits"),
        ("boxes", "smooth-l1", "regression"),
    ]
    plan = losses.output_losses(m, m, {"boxes": "mse", "logits": "none"})
    assert [(p.loss, p.kind) for p in plan] == [("none", "given"), ("mse", "given")]
    with pytest.raises(CarveError, match="no output 'box'.*outputs: logits, boxes"):
        losses.output_losses(m, m, {"box": "mse"})
    with pytest.raises(CarveError, match="boxes=l2: unknown loss"):
        losses.output_losses(m, m, {"boxes": "l2"})
    with pytest.raises(CarveError, match="every output is `none`"):
        losses.output_losses(m, m, {"boxes": "none", "logits": "none"})
    with pytest.raises(CarveError, match="teacher has no output 'boxes'"):
        losses.output_losses(m, graph({"logits": [10]}))
    with pytest.raises(CarveError, match="unknown loss"):
        FinetuneOptions(output_losses={"boxes": "huber"}).check()
    opts = from_mapping(FinetuneOptions, {"output_losses": {"boxes": "mse"}}, where="pass 'finetune'")
    assert opts.output_losses == {"boxes": "mse"}  # a recipe's finetune pass takes the same mapping


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        ("kl", (6, 10)),
        ("smooth-l1", (6, 39, 4, 4)),
        ("mse", (6, 20, 4)),
        ("channel-kl", (6, 5, 4, 4)),
        ("cosine", (6, 8)),
    ],
)
def test_each_loss_is_zero_at_the_teacher_and_pulls_towards_it(loss, shape):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(shape, generator=g) * 3
    assert float(losses.distil(loss, teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-5)
    student = (teacher + torch.randn(shape, generator=g)).requires_grad_(True)
    value = losses.distil(loss, student, teacher, 2.0)
    value.backward()
    assert float(value.detach()) > 1e-3
    stepped = (student - 0.05 * student.grad / student.grad.norm()).detach()
    assert float(losses.distil(loss, stepped, teacher, 2.0)) < float(value.detach())  # a gradient step comes closer


def test_regression_is_in_units_of_the_teachers_spread_per_channel():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(8, 3, 5, 5, generator=g)
    s = t + 0.3 * torch.randn(8, 3, 5, 5, generator=g)
    scale = torch.tensor([1.0, 30.0, 0.1]).reshape(1, 3, 1, 1)  # pixels, big logits, small offsets
    for name in ("smooth-l1", "mse"):
        assert float(losses.distil(name, s * scale, t * scale, 1)) == pytest.approx(float(losses.distil(name, s, t, 1)))
    # an unscaled MSE would be ruled by the big channel; this one is not
    spread = losses.spread(t * scale).flatten()
    assert spread[1] / spread[2] == pytest.approx(300, rel=0.3)
    flat = torch.zeros(4, 2, 3)
    assert torch.isfinite(losses.regression(flat + 1e-3, flat))  # a constant teacher does not divide by zero


def test_channel_kl_is_the_logit_kl_at_every_position_and_cosine_ignores_the_norm():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    per_position = [losses.distillation(s[:, :, i, j], t[:, :, i, j], 2.0) for i in range(3) for j in range(3)]
    assert float(losses.channel_distillation(s, t, 2.0)) == pytest.approx(float(sum(per_position) / 9), rel=1e-5)
    e = torch.randn(4, 16, generator=g)
    assert float(losses.cosine(3.0 * e, e)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cosine(-e, e)) == pytest.approx(2.0, abs=1e-6)


def test_cli_output_loss_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "m.onnx", "-o", str(tmp_path / "o.onnx"), "--data", "x", "--output-loss", "out0"])
    assert exc.value.code != 0
    assert "give OUTPUT=LOSS" in capsys.readouterr().err


@pytest.fixture(scope="module")
def detector_files(tmp_path_factory):
    """The zoo detector briefly trained on the synthetic detection set (seconds: outputs that vary with the image), the
    same pruned to ~0.6 of its MACs, and a folder of unlabelled 64 x 64 PNG images (digits on canvases)."""
    from PIL import Image

    from carve import models
    from carve.models.detector import Detector
    from carve.models.train_detector import train_detector
    from carve.pipeline.data.detection import synthetic

    d = tmp_path_factory.mktemp("det")
    images, boxes = synthetic(256, seed=4)
    # the detector's initial weights (train_detector seeds only its own training): unseeded, the held-out check below
    # failed about one run in three; over initial seeds 0-9, 9 met its 20% margin (seed 1: 7%)
    torch.manual_seed(0)
    torch.save(train_detector(Detector(), images, boxes, epochs=2, batch=32).state_dict(), d / "det.pt")
    models.export("detector", d / "det.onnx", weights=str(d / "det.pt"))
    original = P.load(d / "det.onnx")
    P.save(P.prune_model(original, P.PruneOptions(target_macs=0.6)).model, d / "pruned.onnx")
    images, _ = synthetic(96, seed=3)
    (d / "images").mkdir()
    for k, im in enumerate(images):
        Image.fromarray(im).save(d / "images" / f"{k:03d}.png")
    return d


def test_label_free_finetune_of_the_detector_from_an_image_folder(detector_files, tmp_path, capsys):
    d = detector_files
    out = tmp_path / "ft.onnx"
    args = ["finetune", str(d / "pruned.onnx"), "--teacher", str(d / "det.onnx"), "--data", str(d / "images")]
    args += ["-o", str(out), "--epochs", "4", "--batch", "16", "--threads", "1", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["data"]["labelled"] is False and summary["losses"]["ce"] == 0
    assert {n: o["loss"] for n, o in summary["losses"]["outputs"].items()} == {"out0": "yolo", "out1": "yolo"}
    assert summary["history"][-1]["kd"] < summary["history"][0]["kd"]

    # on held-out images, the distillation loss of the heads (what was trained) is lower than the pruned model's
    from carve.pipeline.data.detection import synthetic
    from carve.pipeline.runtime.ort import run

    images, _ = synthetic(32, seed=99)
    x = P.load_data(str(d / "images"), model=P.load(d / "det.onnx")).preprocess.apply(images)
    teacher, before, after = (run(P.load(f), {"input": x}) for f in (d / "det.onnx", d / "pruned.onnx", out))
    held_out = lambda y: sum(  # noqa: E731
        float(losses.distil("yolo", torch.from_numpy(s), torch.from_numpy(t), 4.0, anchors=3, classes=8))
        for s, t in zip(y, teacher)
    )
    assert held_out(after) < 0.8 * held_out(before)


def test_an_override_changes_the_loss_of_one_output(detector_files):
    d = detector_files
    student, teacher = P.load(d / "pruned.onnx"), P.load(d / "det.onnx")
    data = P.load_data(str(d / "images"), model=teacher, samples=32)
    opts = FinetuneOptions(steps=2, batch=16, threads=1, output_losses={"out1": "none"})
    r = finetune(student, data, opts, teacher=teacher)
    assert r.summary["losses"]["outputs"]["out1"] == {"loss": "none", "kind": "given", "why": "chosen by the user"}
    assert r.summary["losses"]["outputs"]["out0"]["kind"] == "detection"
    assert onnx.checker.check_model(r.model.proto) is None
