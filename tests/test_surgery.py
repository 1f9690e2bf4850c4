"""Surgery: ratio 0 is the identity bit for bit; results are smaller, valid, explained in their metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from graphs import G, analyse_proto, assert_exact

import carve as P
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import check
from carve.pipeline.graph.plan import Plan
from carve.pipeline.runtime import ort as ortutil


def test_ratio_zero_is_the_identity_bit_for_bit(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    p = P.plan(P.analyse(m), 0.0)
    assert p.n_removed == 0
    pruned = P.prune(m, p)
    feeds = ortutil.random_feeds(m, batch=4)
    assert np.array_equal(ortutil.run(tiny_resnet_onnx, feeds)[0], ortutil.run(pruned, feeds)[0])
    assert [t.SerializeToString() for t in m.graph.initializer] == [
        t.SerializeToString() for t in pruned.graph.initializer
    ]


def test_prune_is_exact_smaller_and_explained(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    p = P.plan(P.analyse(m), 0.5, widths=P.Widths(round_to=2))
    pruned = assert_exact(m, p, batch=3)
    check(pruned.proto, full=True)
    meta = pruned.metadata()
    summary = json.loads(meta["carve.prune"])
    assert summary["params_after"] < 0.5 * summary["params_before"]
    assert summary["criterion"] == "l1" and summary["options"]["ratio"] == 0.5
    history = json.loads(meta["carve.history"])
    assert history[-1]["step"] == "prune" and meta["carve.version"] == P.__version__
    assert m.weight_bytes() > pruned.weight_bytes()


def test_prune_leaves_the_input_model_untouched(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    before = m.proto.SerializeToString()
    P.prune(m, P.plan(P.analyse(m), 0.5))
    assert m.proto.SerializeToString() == before


def test_pruning_twice_accumulates_history(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    once = P.prune(m, P.plan(P.analyse(m), 0.3))
    twice = P.prune(once, P.plan(P.analyse(once), 0.3))
    assert [h["step"] for h in json.loads(twice.metadata()["carve.history"])] == ["prune", "prune"]
    feeds = ortutil.random_feeds(twice)
    assert ortutil.run(twice, feeds)[0].shape == (1, 10)


def test_plan_for_another_model_is_refused(tiny_resnet_onnx):
    m = P.load(tiny_resnet_onnx)
    g = G()
    other, an = analyse_proto(g.model([g.conv(g.relu(g.conv("x", 4)), 2)]))
    with pytest.raises(CarveError, match="different model"):
        P.prune(m, P.plan(an, 0.5))


def test_plan_that_empties_a_tensor_or_removes_frozen_units_is_refused():
    g = G()
    a = g.relu(g.conv("x", 4))
    model, an = analyse_proto(g.model([g.conv(a, 2)]))
    all_of_a = np.zeros(an.n_units, bool)
    all_of_a[an.units_of_tensor(a)] = True
    with pytest.raises(CarveError, match="removes every channel"):
        P.prune(model, Plan(an, all_of_a))
    frozen = an.unit_frozen.copy()
    with pytest.raises(CarveError, match="frozen"):
        P.prune(model, Plan(an, frozen))
