"""BatchNormalization re-inserted for fine-tuning a folded graph (issue 26): insertion and fold-back are the identity
before training on random CNNs (property), fold-back is exact for any BN values, the written model keeps the input's
structure; fine-tuning a folded export recovers as well as the BN-kept export, and clearly better than training the
folded convs as they are; the options, the CLI flag and the summary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import cnn

import carve as P
from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph.history import history
from carve.pipeline.graph.model import Model
from carve.pipeline.runtime import ort as ortutil
from carve.pipeline.training import bn_insert
from carve.pipeline.training.finetune import FinetuneOptions, finetune


def _run(model: Model, x: np.ndarray) -> list[np.ndarray]:
    return ortutil.run(model, {model.input_names[0]: x})


def _close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want):
        scale = max(float(np.abs(w).max()), 1e-3)
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * scale)


def _ops(model: Model) -> list[tuple[str, int]]:
    return [(n.op_type, len([i for i in n.input if i])) for n in model.graph.node]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn(), seed=st.integers(0, 1000), rescale=st.booleans())
def test_insertion_and_fold_back_are_the_identity_on_random_cnns(proto, seed, rescale):
    model = Model(proto)
    rng = np.random.default_rng(seed)
    calib = Dataset(rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), None, "random", Preprocess.for_model(model))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(model, x)

    aug, inserted = bn_insert.insert(model, calib, rescale=rescale)
    assert len(inserted) == len(bn_insert.candidates(model)) >= 1  # every random CNN starts with a conv
    assert sum(n.op_type == "BatchNormalization" for n in aug.graph.node) == len(inserted) + sum(
        n.op_type == "BatchNormalization" for n in model.graph.node
    )
    _close(_run(aug, x), want)  # the inserted BNs (inference mode) change nothing

    back = bn_insert.fold_back(aug, model, inserted)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in model.graph.node]  # no extra node
    assert [n.output[:] for n in back.graph.node] == [n.output[:] for n in model.graph.node]
    _close(_run(back, x), want)

    # fold-back is exact for whatever values training leaves in the BNs
    for ins in inserted:
        c = len(aug.array(ins.mean))
        aug.set_array(ins.scale, rng.uniform(-2, 2, c).astype(np.float32))
        aug.set_array(ins.shift, rng.standard_normal(c).astype(np.float32))
        aug.set_array(ins.mean, aug.array(ins.mean) + rng.standard_normal(c).astype(np.float32) * 0.1)
        aug.set_array(ins.var, aug.array(ins.var) * rng.uniform(0.5, 2, c).astype(np.float32) + 1e-3)
    _close(_run(bn_insert.fold_back(aug, model, inserted), x), _run(aug, x))


def test_modes_and_bad_options(tmp_path):
    from carve import models

    models.export("resnet20", tmp_path / "folded.onnx", weights="random", fold_bn=True)
    models.export("resnet20", tmp_path / "kept.onnx", weights="random")
    folded, kept = P.load(tmp_path / "folded.onnx"), P.load(tmp_path / "kept.onnx")
    assert bn_insert.decide("auto", folded) and not bn_insert.decide("auto", kept)
    assert bn_insert.decide("insert", kept) and not bn_insert.decide("keep", folded)
    assert not bn_insert.decide("off", folded)
    assert not bn_insert.candidates(kept)  # every conv of the BN-kept export has its BN
    with pytest.raises(CarveError, match="`bn` must be one of"):
        FinetuneOptions(bn="fold").check()
    with pytest.raises(CarveError, match="`bn_init`"):
        FinetuneOptions(bn_init="zero").check()
    # the recipe key (the finetune and gradual passes read the same options) and the CLI flag
    from carve.pipeline.cli import main
    from carve.pipeline.training.options import finetune_options

    opts, _ = finetune_options({"bn": "insert", "bn_init": "identity"}, "pass 'finetune'")
    assert (opts.bn, opts.bn_init) == ("insert", "identity")
    with pytest.raises(CarveError, match="`bn` must be one of"):
        finetune_options({"bn": "on"}, "pass 'finetune'")[0].check()
    with pytest.raises(SystemExit):
        main(
            [
                "finetune",
                str(tmp_path / "folded.onnx"),
                "--data",
                "digits",
                "--bn",
                "fold",
                "-o",
                str(tmp_path / "o.onnx"),
            ]
        )


def _mlp(seed: int) -> Model:
    """x -> Flatten -> Gemm(transB=1) -> Relu -> Gemm(transB=0, no bias) -> Relu -> Gemm (logits, a graph output)."""
    from graphs import G, analyse_proto

    g = G((1, 3, 3, 3), seed=seed)
    f = g.op("Flatten", ["x"], channels=27, axis=1)
    h = g.relu(g.op("Gemm", [f, g.weight(7, 27), g.const(np.full(7, 0.3, np.float32))], channels=7, transB=1))
    h = g.relu(g.op("Gemm", [h, g.weight(7, 5)], channels=5))
    return analyse_proto(g.model([g.op("Gemm", [h, g.weight(3, 5)], channels=3, transB=1)]))[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_hidden_gemms_get_a_bn_that_is_the_identity_and_folds_back_exactly(seed):
    """A dynamo export folds BatchNorm1d into the Linear before it: hidden Gemms (weights [out, in] or [in, out], with
    or without a bias) get a BN too, the logits layer none; insertion and fold-back are the identity, fold-back is
    exact for any BN values (along the right axis of each weight)."""
    model = _mlp(seed)
    rng = np.random.default_rng(seed)
    calib = Dataset(rng.integers(0, 256, (16, 3, 3, 3), dtype=np.uint8), None, "random", Preprocess.for_model(model))
    x = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    want = _run(model, x)
    aug, inserted = bn_insert.insert(model, calib)
    assert [i.axis for i in inserted] == [0, 1]
    _close(_run(aug, x), want)
    for ins in inserted:
        c = len(aug.array(ins.mean))
        aug.set_array(ins.scale, rng.uniform(-2, 2, c).astype(np.float32))
        aug.set_array(ins.shift, rng.standard_normal(c).astype(np.float32))
    back = bn_insert.fold_back(aug, model, inserted)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in model.graph.node]
    _close(_run(back, x), _run(aug, x))


def test_a_layernorm_network_gets_no_bn_after_its_gemms():
    from graphs import G, analyse_proto

    g = G((1, 3, 3, 3), seed=0)
    f = g.op("Flatten", ["x"], channels=27, axis=1)
    h = g.op("Gemm", [f, g.weight(7, 27), g.const(np.zeros(7, np.float32))], channels=7, transB=1)
    ln = g.op("LayerNormalization", [h, g.const(np.ones(7, np.float32)), g.const(np.zeros(7, np.float32))], axis=-1)
    h = g.relu(g.op("Gemm", [g.relu(ln), g.weight(7, 5)], channels=5))
    model = analyse_proto(g.model([g.op("Gemm", [h, g.weight(3, 5)], channels=3, transB=1)]))[0]
    assert bn_insert.candidates(model) == []


def _digits(model, split: str, n: int | None = None) -> Dataset:
    return load_data(f"digits:{split}", model=model, samples=n, seed=0)


def test_a_graph_without_bn_trains_with_inserted_bn_and_keeps_its_structure(tmp_path):
    """Digits, LeNet-5 (no BN at all, like a folded export): pruned and fine-tuned with BN inserted it recovers at least
    as well as trained as it is; the written graph is the input's, verified in ORT, and its history says so."""
    from carve import models
    from carve.pipeline.measure.evaluate import evaluate

    models.export("lenet5", tmp_path / "lenet5.onnx")
    original = P.load(tmp_path / "lenet5.onnx")
    pruned = P.prune_model(original, P.PruneOptions(ratio=0.6)).model
    convs = sum(n.op_type == "Conv" for n in pruned.graph.node)
    layers = convs + 2  # and the two hidden fully-connected layers (not the logits)
    assert [n.op_type for n in bn_insert.candidates(pruned)] == ["Conv"] * convs + ["Gemm"] * 2
    top1 = {}
    for bn in ("auto", "keep"):
        opts = FinetuneOptions(steps=20, batch=32, flip=False, threads=1, bn=bn)
        r = finetune(pruned, _digits(original, "train"), opts, teacher=original)
        top1[bn] = evaluate(r.model, _digits(original, "test"))["top1"]
        s = r.summary["bn"]
        assert [n.op_type for n in r.model.graph.node] == [n.op_type for n in pruned.graph.node]
        assert r.summary["torch_vs_ort"]["max_rel"] < 1e-3
        assert history(r.model)[-1]["summary"]["bn"] == s
        assert s["inserted"] == (layers if bn == "auto" else 0) and s["mode"] == bn
    assert top1["auto"] >= top1["keep"] - 0.01, top1


def test_folded_resnet20_recovers_like_the_bn_kept_export(tmp_path, cifar_train, cifar_test, resnet20_weights):
    """CIFAR ResNet-20 pruned to half its MACs, 30 steps from the same pruned network with its BN kept or folded into
    the convs: with BN re-inserted the folded graph ends where the BN-kept one does, and far above the same folded
    graph trained as it is (``bn: keep``). (Pruned apart, the two exports lose different channels: L1 ranks folded
    filters, which carry BN's scale; that choice is the criterion's, not fine-tuning's.)"""
    from carve import models
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.passes import PassContext, build

    models.export("resnet20", tmp_path / "kept.onnx")
    original = P.load(tmp_path / "kept.onnx")
    fold = build("fold_bn")
    pruned = P.prune_model(original, P.PruneOptions(target_macs=0.5, round_to=8)).model
    graphs = {
        "kept": (pruned, original),
        "folded": (fold(pruned, PassContext()).model, fold(original, PassContext()).model),
    }
    assert not any(n.op_type == "BatchNormalization" for n in graphs["folded"][0].graph.node)
    train = load_data(cifar_train, model=original, samples=2000, seed=0)
    test = load_data(cifar_test, model=original, samples=500, seed=0)
    top1 = {}
    for export, bn in (("kept", "auto"), ("folded", "auto"), ("folded", "keep")):
        student, teacher = graphs[export]
        r = finetune(student, train, FinetuneOptions(steps=30, batch=64, threads=1, bn=bn), teacher=teacher)
        top1[export, bn] = evaluate(r.model, test)["top1"]
    assert top1["folded", "auto"] >= top1["kept", "auto"] - 0.03, top1
    assert top1["folded", "auto"] > top1["folded", "keep"] + 0.15, top1


def test_bn_repair_on_a_folded_graph_does_what_it_does_with_bn_kept(
    tmp_path, cifar_train, cifar_test, resnet20_weights
):
    """``repairs: [bn]`` re-estimates a BN-kept graph's statistics; on the same pruned network folded it re-normalises
    the convs to the original's channel statistics, and repairs as much (no training)."""
    from carve import models
    from carve.pipeline.measure.evaluate import evaluate
    from carve.pipeline.passes import PassContext, build
    from carve.plugins.repairs.bn import BatchNormStatistics

    models.export("resnet20", tmp_path / "kept.onnx")
    original = P.load(tmp_path / "kept.onnx")
    calib = load_data(cifar_train, model=original, samples=256, seed=0)
    test = load_data(cifar_test, model=original, samples=500, seed=0)
    pruned = P.prune_model(original, P.PruneOptions(target_macs=0.5, round_to=8)).model
    kept = P.prune_model(original, P.PruneOptions(target_macs=0.5, round_to=8, repairs=["bn"]), calib=calib).model
    fold = build("fold_bn")
    folded, folded_original = fold(pruned, PassContext()).model, fold(original, PassContext()).model
    r = BatchNormStatistics().apply(folded_original, None, folded, calib)
    assert r.counts == {"bn": sum(n.op_type == "Conv" for n in folded.graph.node)}
    assert [n.op_type for n in r.model.graph.node] == [n.op_type for n in folded.graph.node]
    top1 = {k: evaluate(m, test)["top1"] for k, m in (("none", folded), ("kept", kept), ("folded", r.model))}
    assert top1["folded"] > top1["none"] + 0.15 and top1["folded"] >= top1["kept"] - 0.05, top1
