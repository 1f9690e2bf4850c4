"""Real exports of small transformer modules (:mod:`tmodels`, no optional package needed): a timm-style ViT (with and
without ``scaled_dot_product_attention``), a BERT-style encoder, a ConvNeXt stage, a Swin-style window block and
torch's ``nn.MultiheadAttention``, exported with the TorchScript exporter (opset 17, dynamic batch) and, for some, the
dynamo exporter (opset 18). Each is analysed (attention, residual stream and MLP prunable), pruned at ratio 0.5 in
both attention modes and verified in ONNX Runtime by ``prune_model`` itself."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from tmodels import TinyBert, TinyConvNeXt, TinySwin, TinyViT, TorchMHA

from carve.pipeline import graph as cgraph
from carve.pipeline.graph.channels import analyse
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.graph.overview import prunable_macs
from carve.pipeline.pruning.prune import PruneOptions, prune_model
from carve.pipeline.runtime import ort as ortutil

MODELS = {
    "vit": (lambda: TinyViT(), lambda: torch.randn(1, 3, 16, 16)),
    "vit_sdpa": (lambda: TinyViT(sdpa=True), lambda: torch.randn(1, 3, 16, 16)),
    "bert": (lambda: TinyBert(), lambda: torch.randint(0, 30, (1, 8))),
    "convnext": (lambda: TinyConvNeXt(), lambda: torch.randn(1, 3, 16, 16)),
    "swin": (lambda: TinySwin(), lambda: torch.randn(1, 3, 16, 16)),
    "mha": (lambda: TorchMHA(), lambda: torch.randn(1, 5, 6)),
}
HAS_ATTENTION = {"vit", "vit_sdpa", "bert", "swin", "mha"}


def export(name: str, exporter: str = "torchscript"):
    torch.manual_seed(0)
    make, example = MODELS[name]
    m, x = make().eval(), example()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            f = io.BytesIO()
            torch.onnx.export(
                m,
                (x,),
                f,
                opset_version=17,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            )
            proto = onnx.load_from_string(f.getvalue())
        else:
            dim = torch.export.Dim("b", max=64)
            proto = torch.onnx.export(
                m, (x,), dynamo=True, opset_version=18, dynamic_shapes=({0: dim},), verbose=False
            ).model_proto
    return cgraph.from_proto(proto)


def check(model, name: str):
    an = analyse(model)
    share = prunable_macs(an) / max(1, model_cost(model).macs)
    assert share > 0.9, f"{name}: only {share:.0%} of the MACs prunable: {an.summary()['frozen_reasons']}"
    if name in HAS_ATTENTION:
        assert an.contract_records, f"{name}: no attention product followed"
    feeds = ortutil.random_feeds(model, batch=3, seed=0)
    for mode in ("heads", "width"):
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, attention=mode))
        assert report.macs_ratio < 0.65, (mode, report.macs_ratio)
        assert report.verify.reference == "masked statistics"  # every one of these has a LayerNorm stream
        assert report.inexact.units > 0 and np.isfinite(report.inexact.error["max_rel"])
        out = ortutil.run(report.model, feeds)[0]
        assert out.shape == ortutil.run(model, feeds)[0].shape and np.isfinite(out).all()
    return an


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchscript_exports_prune_and_verify(name):
    check(export(name), name)


def head_split_shapes(model) -> list[tuple]:
    """The shapes the QKV head-split Reshapes produce (``[B, T, 3, heads, head_dim]``)."""
    return [
        tuple(model.shape(n.output[0]))
        for n in model.graph.node
        if n.op_type == "Reshape" and len(model.shape(n.output[0]) or ()) == 5
    ]


def test_vit_heads_and_widths_leave_the_export_consistent():
    model = export("vit")
    assert set(head_split_shapes(model)) == {(None, 17, 3, 3, 8)}
    pruned = prune_model(model, PruneOptions(ratio=0.5, round_to=1)).model
    assert set(head_split_shapes(pruned)) == {(None, 17, 3, 2, 8)}  # 3 heads -> 2, each whole
    pruned = prune_model(model, PruneOptions(ratio=0.5, round_to=1, attention="width")).model
    assert set(head_split_shapes(pruned)) == {(None, 17, 3, 3, 4)}  # 3 heads of width 8 -> 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_sdpa", "bert", "swin"])
def test_dynamo_exports_prune_and_verify(name):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (in the dev extra)")
    check(export(name, "dynamo"), name)


@pytest.mark.parametrize("repair", ["bias", "lsq"])
def test_repairs_see_what_the_pruned_model_computes(repair):
    """An inexact removal (LayerNorm statistics) and removed Q/K pairs change more than zeroed columns say: the
    repairs run on the masked reference, so they correct for what the pruned model computes; verification still
    proves the result equal to its repaired reference."""
    from carve.pipeline.data.datasets import Dataset, Preprocess

    model = export("vit")
    rng = np.random.default_rng(0)
    calib = Dataset(rng.random((96, 3, 16, 16)).astype(np.float32), None, "random", Preprocess(size=(16, 16)))
    x = {"x": rng.random((32, 3, 16, 16)).astype(np.float32)}
    y0 = ortutil.run(model, x)[0]

    def error(**opts):
        report = prune_model(model, PruneOptions(ratio=0.5, round_to=1, **opts), calib=calib)
        assert report.verify.reference == "masked statistics"
        return float(np.abs(ortutil.run(report.model, x)[0] - y0).mean() / np.abs(y0).mean())

    assert error(repairs=[repair]) < 0.5 * error()


@pytest.mark.slow
def test_readme_transformer_commands_run_as_written(tmp_path, monkeypatch):
    """The README's transformer commands, on a small ViT export named as the README names it."""
    import re
    import shlex

    from conftest import REPO

    from carve.pipeline.cli import main

    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if b.startswith("carve inspect vit.onnx"))
    onnx.save(export("vit").proto, str(tmp_path / "vit.onnx"))
    monkeypatch.chdir(tmp_path)
    for line in [ln for ln in block.splitlines() if ln.strip()]:
        args = shlex.split(line.split("  #")[0])
        if args[1] == "bench":
            args += ["--rounds", "3"]  # the same command, fewer timing rounds
        elif args[1] == "prune":
            args += ["--round-to", "1", "--no-measure"]  # the small model's 24 channels; timing is bench's job
        assert main(args[1:]) == 0, line
    assert (
        (tmp_path / "vit_p.onnx").exists() and (tmp_path / "vit_w.onnx").exists() and (tmp_path / "vit.json").exists()
    )
