"""The streamed compensation runner gives what the level-by-level runner gives, on a graph where several targets
become ready at once (two consumers of one tensor, a concat), with a Gemm consumer, strided and 1x1 convs and BN;
and a memory budget too small for the stream falls back to levels."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import G

import carve as P
from carve.pipeline.data import compensate as C
from carve.pipeline.data.datasets import Dataset, Preprocess
from carve.pipeline.graph import from_proto
from carve.pipeline.graph.rewrite import ensure_biases
from carve.pipeline.graph.surgery import zero_removed
from carve.pipeline.pruning.repair import repairs
from carve.pipeline.runtime import ort as ortutil


def branching_model():
    g = G(shape=(1, 3, 12, 12), seed=3)
    a = g.relu(g.bn(g.conv("x", 12)))
    b = g.relu(g.bn(g.conv(a, 10)))  # two consumers of `a`: both ready at the same time
    c = g.relu(g.conv(a, 10, k=1))
    d = g.relu(g.bn(g.conv(g.add(b, c), 16, stride=2)))
    e = g.relu(g.conv(g.concat(d, g.relu(g.conv(d, 8, k=1))), 12))
    return from_proto(g.model([g.head(e, 7)]))


def data(n=40):
    rng = np.random.default_rng(0)
    return Dataset(rng.standard_normal((n, 3, 12, 12)).astype(np.float32), None, "random", Preprocess())


@pytest.mark.parametrize("method", ["lsq", "bias", "bn"])
def test_stream_equals_levels(method, monkeypatch):
    m = branching_model()
    ensure_biases(m)
    plan = P.plan(P.analyse(m), 0.5)
    results = []
    for budget in (0, 1 << 40):  # the stream cannot fit 0 bytes: level by level; then the stream
        monkeypatch.setattr(C, "STREAM_MEMORY_BUDGET", budget)
        result = repairs.get(method)().apply(m, plan, zero_removed(m, plan), data())
        assert result.details
        results.append(result)
    a, b = results
    if method == "lsq":
        # the same problems are solved: the same squared residuals of plain pruning and of the refit, relative to the
        # targets' energy (segment sessions round differently from whole-model ones, and each refit feeds the next)
        assert a.stats["errors"].keys() == b.stats["errors"].keys()
        for k, errors in a.stats["errors"].items():
            energy = a.stats["target_energy"][k]
            assert b.stats["target_energy"][k] == pytest.approx(energy, rel=1e-4)
            np.testing.assert_allclose(np.add(b.stats["errors"][k], energy), np.add(errors, energy), atol=1e-3 * energy)
    else:
        for t in a.model.graph.initializer:
            x, y = a.model.array(t.name), b.model.array(t.name)
            if x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * (np.abs(x).max() + 1e-6), err_msg=t.name)
    x = data(8).images
    ya, yb = ortutil.run(a.model, {"x": x})[0], ortutil.run(b.model, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, atol=2e-3 * np.abs(ya).max())


def test_stream_memory_estimate_grows_with_samples_and_models():
    m = branching_model()
    one = C.stream_bytes(m, 10, both=False)
    assert one > 0 and C.stream_bytes(m, 20, both=False) == 2 * one and C.stream_bytes(m, 10) == 2 * one
    # at least the largest activation (12 x 12 x 12 floats per sample) is alive at some point
    assert one >= 10 * 12 * 12 * 12 * 4
