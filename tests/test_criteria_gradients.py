"""Loss-based criteria (taylor, cep) and sparsification, on real digits data and LeNet-5."""

from __future__ import annotations

import numpy as np
import pytest

import carve as P
from carve import models
from carve.pipeline.data.datasets import load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import load
from carve.pipeline.pruning.criterion import ScoreContext, criteria
from carve.plugins.passes.sparsify import sparsify


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("lenet") / "lenet5.onnx"
    models.export("lenet5", path)
    return load(path)


@pytest.fixture(scope="module")
def digits(lenet):
    return load_data("digits:train", model=lenet, samples=256)


def conv1(an):
    return next(s for s in an.producers() if s.count == 6)


@pytest.mark.parametrize("name,opts", [("cep", {}), ("taylor", {}), ("cep", {"variant": "delta"})])
def test_a_channel_whose_removal_cannot_change_the_loss_scores_zero(lenet, digits, name, opts):
    m = lenet.copy()
    conv2 = next(n for n in m.graph.node if n.op_type == "Conv" and n.name != m.graph.node[0].name)
    w = m.array(conv2.input[1]).copy()
    w[:, 4] = 0  # nothing reads conv1's channel 4 any more
    m.set_array(conv2.input[1], w)
    an = P.analyse(m)
    src = conv1(an)
    s = criteria.get(name)(**opts).element_scores(ScoreContext(an, calib=digits))[src.start : src.start + src.count]
    assert s[4] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(s, 4) != 0)  # taylor/cep are magnitudes (> 0); removing a used channel changes the loss


def test_cep_hcep_keeps_the_top_of_every_layer(lenet, digits):
    an = P.analyse(lenet)
    s = criteria.get("cep")(hcep=0.2).element_scores(ScoreContext(an, calib=digits))
    for src in an.producers():
        if an.unit_frozen[an.source_units(src)].all():
            continue
        assert np.isinf(s[src.start : src.start + src.count]).sum() == max(1, int(np.ceil(0.2 * src.count)))


def test_loss_criteria_need_labels(lenet):
    an = P.analyse(lenet)
    unlabelled = load_data("digits", model=lenet, samples=32)
    unlabelled.labels = None
    with pytest.raises(CarveError, match="needs labelled calibration data"):
        P.plan(an, scores=P.score(an, "cep", calib=unlabelled))


def test_cep_plan_prunes_and_keeps_accuracy_reasonable(lenet, digits):
    from carve.pipeline.measure.evaluate import evaluate

    an = P.analyse(lenet)
    test = load_data("digits:test", model=lenet)
    p = P.plan(an, 0.3, scores=P.score(an, "cep", calib=digits))
    r = P.plan(an, 0.3, scores=P.score(an, "random", seed=3))
    acc_cep = evaluate(P.prune(lenet, p), test)["top1"]
    acc_rand = evaluate(P.prune(lenet, r), test)["top1"]
    assert acc_cep >= acc_rand - 0.02 and acc_cep > 0.8


@pytest.mark.parametrize("criterion", ["magnitude", "cep"])
def test_unstructured_sparsity_is_reached(lenet, digits, criterion):
    res = sparsify(lenet, sparsity=0.6, criterion=criterion, data=digits, hcep=0.05)
    assert res.sparsity == pytest.approx(0.6, abs=0.02)
    for n in lenet.graph.node:  # shapes unchanged
        for i in n.input:
            if lenet.is_const(i):
                assert res.model.array(i).shape == lenet.array(i).shape


def test_two_four_pattern(lenet):
    res = sparsify(lenet, pattern="2:4")
    fc1 = next(n for n in res.model.graph.node if n.op_type == "Gemm")
    w = res.model.array(fc1.input[1])  # [120, 400] with transB=1: groups of 4 along the 400 inputs
    groups = w.reshape(w.shape[0], -1, 4)
    assert ((groups == 0).sum(-1) >= 2).all()
    assert any("not a multiple of 4" in s for s in res.skipped)  # conv1 has 1 input channel


def test_cep_delta_is_the_measured_loss_increase_of_removing_a_unit(lenet, digits):
    """The delta score of a unit equals the loss of the model pruned of exactly that unit minus the original's."""
    import torch
    import torch.nn.functional as F

    from carve.pipeline.graph.plan import Plan
    from carve.pipeline.runtime.torch_graph import TorchGraph

    an = P.analyse(lenet)
    ctx = ScoreContext(an, calib=digits)
    units = an.unit_scores(criteria.get("cep")(variant="delta", samples=None).element_scores(ctx))

    def loss(model) -> float:
        tg = TorchGraph(model).eval()
        with torch.no_grad():
            total = sum(
                float(F.cross_entropy(tg(torch.from_numpy(x)), torch.from_numpy(y), reduction="sum"))
                for x, y in digits.batches(64)
            )
        return total / len(digits)

    base = loss(lenet)
    for u in np.random.default_rng(0).choice(an.prunable_units(), 3, replace=False):
        removed = np.zeros(an.n_units, dtype=bool)
        removed[u] = True
        pruned = P.prune(lenet, Plan(an, removed))
        assert units[u] == pytest.approx(loss(pruned) - base, rel=1e-4, abs=1e-6)
