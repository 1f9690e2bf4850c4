"""The energy criterion (issue 26): E[x_c^2] * ||W_eff[:, c]||^2 summed over the layers reading channel c. It scores
the same on a graph and on that graph with its BatchNormalization folded into the convs (property, random CNNs), is
unchanged by the ReLU rescaling that changes L1's choice, matches its definition, and on the real folded ResNet-20
export picks the channels it picks on the BN-kept export, which repair far better than L1's folded choice."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G, analyse_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import cnn

import carve as P
from carve.pipeline.data.datasets import Dataset, Preprocess, load_data
from carve.pipeline.graph.fold import fold_batchnorms
from carve.pipeline.graph.model import Model
from carve.pipeline.pruning.planner import Scores, Widths, plan, score
from carve.pipeline.runtime import ort as ortutil


def _calib(model: Model, seed: int, n: int = 8) -> Dataset:
    rng = np.random.default_rng(seed)
    hw = model.shape(model.input_names[0])[2]
    return Dataset(rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8), None, "random", Preprocess.for_model(model))


def _scores(model: Model, calib: Dataset, criterion: str = "energy"):
    an = P.analyse(model)
    return an, score(an, criterion, calib=calib).values


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(proto=cnn(), seed=st.integers(0, 1000))
def test_energy_is_the_same_with_bn_kept_and_folded_on_random_cnns(proto, seed):
    model = Model(proto)
    folded, n, _ = fold_batchnorms(model)
    calib = _calib(model, seed)
    an_k, kept = _scores(model, calib)
    an_f, fold = _scores(folded, calib)
    assert an_k.n_units == an_f.n_units
    np.testing.assert_allclose(fold, kept, rtol=1e-3, atol=1e-5 * max(float(np.abs(kept).max()), 1e-12))
    if n:  # the same channels go (up to exact ties, which float rounding may order either way)
        rk, rf = plan(an_k, 0.5, scores=_S(kept)).removed, plan(an_f, 0.5, scores=_S(fold)).removed
        assert rk.sum() == rf.sum()
        assert kept[rk].sum() == pytest.approx(kept[rf].sum(), rel=1e-4, abs=1e-6 * max(float(kept.max()), 1e-12))


def _S(values: np.ndarray) -> Scores:
    return Scores(values, "energy")


def _two_layers(scale: np.ndarray | None = None) -> Model:
    """conv(3 -> 6) -> Relu -> conv(6 -> 4) -> Relu -> head; ``scale``: the first conv's output channels times s > 0
    and the second conv's input columns times 1 / s (the same function)."""
    g = G((1, 3, 8, 8), seed=3)
    h = g.relu(g.conv("x", 6))
    y = g.relu(g.conv(h, 4))
    m = Model(g.model([g.head(y, classes=3)]))
    if scale is not None:
        c1, c2 = [n for n in m.graph.node if n.op_type == "Conv"]
        m.set_array(c1.input[1], m.array(c1.input[1]) * scale[:, None, None, None].astype(np.float32))
        m.set_array(c1.input[2], m.array(c1.input[2]) * scale.astype(np.float32))
        m.set_array(c2.input[1], m.array(c2.input[1]) / scale[None, :, None, None].astype(np.float32))
    return m


def test_energy_ignores_the_relu_rescaling_that_changes_l1():
    base = _two_layers()
    s = np.array([0.01, 50.0, 1.0, 0.02, 30.0, 1.0])
    moved = _two_layers(s)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ortutil.run(base, {"x": x})[0]
    np.testing.assert_allclose(ortutil.run(moved, {"x": x})[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    calib = _calib(base, 0)
    an_b, e_b = _scores(base, calib)
    an_m, e_m = _scores(moved, calib)
    h = _units_of_first_conv(an_b)  # the rescaled channels (the input's change with conv 1's rows, and are frozen)
    assert an_b.unit_frozen[np.setdiff1d(np.arange(an_b.n_units), h)[:3]].all()
    np.testing.assert_allclose(e_m[h], e_b[h], rtol=1e-3)
    assert (plan(an_b, 0.5, scores=_S(e_b)).removed == plan(an_m, 0.5, scores=_S(e_m)).removed).all()
    # L1 follows the scales: it keeps the channels made large and drops the ones made small
    assert (plan(an_b, 0.5, scores="l1").removed != plan(an_m, 0.5, scores="l1").removed).any()


def test_energy_matches_its_definition():
    m = _two_layers()
    calib = _calib(m, 1, n=4)
    an, e = _scores(m, calib)
    c1, c2 = [n for n in m.graph.node if n.op_type == "Conv"]
    relu = m.consumers[c1.output[0]][0]
    x, _ = calib.take(np.arange(len(calib)))
    from carve.pipeline.data.capture import with_outputs

    h = ortutil.run(Model(with_outputs(m, [relu.output[0]], only=True)), {"x": x})[0].astype(np.float64)
    w = m.array(c2.input[1]).astype(np.float64)
    want = (h**2).mean(axis=(0, 2, 3)) * (w**2).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(e[_units_of_first_conv(an)], want, rtol=1e-4)


def _units_of_first_conv(an) -> np.ndarray:
    first = next(n.name for n in an.model.graph.node if n.op_type == "Conv")
    src = next(s for s in an.producers() if s.name == first)
    return an.unit_of[np.arange(src.start, src.start + src.count)]


def test_energy_needs_calibration_data():
    from carve.pipeline.errors import CarveError

    model, an = analyse_proto(_two_layers().proto)
    with pytest.raises(CarveError, match="calibration data"):
        score(an, "energy")


def test_folded_resnet20_energy_picks_the_bn_kept_channels(tmp_path, cifar_train, cifar_test, resnet20_weights):
    """The real case: ResNet-20 exported with BN kept and folded (eval-mode torch.onnx.export), 2x fewer MACs. L1
    removes other channels on the folded export; energy removes the same on both, and its folded network repairs
    (``repairs: [bn]``) far better than L1's (measured on 2,000 test images: 51% against 26%)."""
    from carve import models
    from carve.pipeline.measure.evaluate import evaluate

    models.export("resnet20", tmp_path / "kept.onnx")
    models.export("resnet20", tmp_path / "folded.onnx", fold_bn=True)
    kept, folded = P.load(tmp_path / "kept.onnx"), P.load(tmp_path / "folded.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    calib = load_data(cifar_train, model=kept, samples=256, seed=0)
    test = load_data(cifar_test, model=kept, samples=500, seed=0)
    removed = {}
    for name, model in (("kept", kept), ("folded", folded)):
        an = P.analyse(model)
        for crit in ("l1", "energy"):
            s = score(an, crit, calib=calib)
            removed[name, crit] = plan(an, P.Target("macs", 0.5), scores=s, widths=Widths(round_to=8)).removed
    assert (removed["kept", "energy"] != removed["folded", "energy"]).sum() <= 2  # a float near-tie may swap a pair
    assert (removed["kept", "l1"] != removed["folded", "l1"]).sum() >= 20
    top1 = {}
    for crit in ("l1", "energy"):
        opts = P.PruneOptions(criterion=crit, target_macs=0.5, round_to=8, repairs=["bn"])
        top1[crit] = evaluate(P.prune_model(folded, opts, calib=calib).model, test)["top1"]
    assert top1["energy"] > top1["l1"] + 0.1, top1


def test_prune_warns_when_l1_ranks_folded_filters():
    import warnings

    from carve.pipeline.errors import CarveWarning

    def warned(model: Model, criterion: str) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            P.prune_model(model, P.PruneOptions(criterion=criterion, ratio=0.5, round_to=1), calib=_calib(model, 0))
        return [str(w.message) for w in caught if issubclass(w.category, CarveWarning)]

    def deep(bn: bool) -> Model:
        g = G((1, 3, 8, 8), seed=3)
        x = "x"
        for _ in range(8):
            x = g.conv(x, 4)
            x = g.relu(g.bn(x) if bn else x)
        return analyse_proto(g.model([g.head(x, classes=3)]))[0]

    folded, kept, shallow = deep(False), deep(True), analyse_proto(_two_layers().proto)[0]
    assert any("criterion 'energy'" in w for w in warned(folded, "l1"))
    said = warned(folded, "energy") + warned(kept, "l1") + warned(shallow, "l1")  # LeNet-like nets often had no BN
    assert not any("criterion 'energy'" in w for w in said)
