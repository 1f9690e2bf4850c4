"""The exports users have: timm ViT/DeiT/Swin/MobileViT/ConvNeXt, transformers' BERT and ViT, ultralytics' C2PSA,
built from configs with random weights (never downloaded) and exported with torch.onnx.export (TorchScript, opset
17). Skipped with the reason when the optional package is absent (CI does not install them: ``pip install timm
transformers ultralytics`` to run these); :mod:`test_transformer_exports` covers the same layouts with modules
written here."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from carve.pipeline import graph as cgraph
from carve.pipeline.graph.channels import analyse
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.overview import prunable_macs
from carve.pipeline.pruning.prune import PruneOptions, prune_model


def export(m: torch.nn.Module, args: tuple, names: list[str]):
    m.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            args,
            f,
            opset_version=17,
            dynamo=False,
            input_names=names,
            output_names=["y"],
            dynamic_axes={**{n: {0: "b"} for n in names}, "y": {0: "b"}},
        )
    return cgraph.from_proto(onnx.load_from_string(f.getvalue()))


def check(model, min_share: float, modes=("heads", "width")):
    an = analyse(model)
    share = prunable_macs(an) / model_cost(model).macs
    assert share >= min_share, f"{share:.1%} of the MACs prunable; frozen: {an.summary()['frozen_reasons']}"
    assert an.contract_records, "no attention product followed"
    for mode in modes:
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, attention=mode))
        assert report.macs_ratio < 0.6 and report.verify is not None
        if report.inexact is not None:
            assert np.isfinite(report.inexact.error["max_rel"])


TIMM = {
    "vit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2), 32),
    "deit_tiny_patch16_224": (dict(img_size=32, patch_size=8, depth=2), 32),
    "swin_tiny_patch4_window7_224": (dict(img_size=56, embed_dim=32, depths=(1, 1), num_heads=(2, 4)), 56),
    "mobilevit_xxs": ({}, 64),
    "convnext_atto": ({}, 32),
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm(name):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    torch.manual_seed(0)
    kwargs, size = TIMM[name]
    m = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    model = export(m, (torch.randn(1, 3, size, size),), ["x"])
    if name == "convnext_atto":
        an = analyse(model)
        assert prunable_macs(an) / model_cost(model).macs > 0.95 and not an.contract_records
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1))
        assert report.inexact.groups >= 4  # one residual stream per stage, each under LayerNorm
        return
    check(model, 0.95)


def test_transformers_bert():
    tr = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install transformers)")
    torch.manual_seed(0)
    cfg = tr.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    m = tr.BertForSequenceClassification(cfg)
    ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
    check(export(m, (ids, mask), ["input_ids", "attention_mask"]), 0.95)


def test_transformers_vit():
    tr = pytest.importorskip("transformers", reason="transformers is an optional extra (pip install transformers)")
    torch.manual_seed(0)
    cfg = tr.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    check(export(tr.ViTForImageClassification(cfg), (torch.randn(1, 3, 32, 32),), ["x"]), 0.95)


def test_ultralytics_c2psa():
    pytest.importorskip("ultralytics", reason="ultralytics is an optional extra (pip install ultralytics)")
    from ultralytics.nn.modules.block import C2PSA

    torch.manual_seed(0)

    class Net(torch.nn.Module):  # C2PSA between two convolutions, as in YOLO11's backbone
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 128, 3, 2, 1)
            self.psa = C2PSA(128, 128, n=1)
            self.out = torch.nn.Conv2d(128, 8, 1)

        def forward(self, x):
            return self.out(self.psa(torch.relu(self.stem(x))))

    model = export(Net(), (torch.randn(1, 3, 16, 16),), ["x"])
    an = analyse(model)
    assert an.contract_records and prunable_macs(an) / model_cost(model).macs > 0.95
    for mode in ("heads", "width"):
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, attention=mode))
        assert report.macs_ratio < 0.6 and report.inexact is None
