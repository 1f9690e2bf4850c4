"""Every zoo model: inspect, prune at 0.3 and 0.5 with --round-to 8, run in ONNX Runtime, shapes unchanged, checker,
and the numerical truth (equal to the original with the removed channels' consumer weights zeroed)."""

from __future__ import annotations

import pytest
from graphs import assert_exact

import carve as P
from carve import models
from carve.pipeline.graph.overview import overview


@pytest.mark.parametrize("name", models.available())
def test_inspect_and_prune_every_zoo_model(name, zoo_dir):
    m = P.load(zoo_dir / f"{name}.onnx")
    an = P.analyse(m)
    info = overview(m, an)
    assert info["summary"]["prunable_fraction"] > 0.5, info["summary"]
    assert all(r["status"] == "prunable" or r["reason"] for r in info["layers"])
    for ratio in (0.3, 0.5):
        p = P.plan(an, ratio, widths=P.Widths(round_to=8))
        assert p.n_removed > 0
        pruned = assert_exact(m, p, batch=2)  # prune() also runs the full ONNX checker
        for out in m.output_names:
            assert pruned.shape(out) == m.shape(out)
        for group in an.groups:  # aligned widths wherever a slice was pruned (a unit of a head group: a head)
            for k, sl in enumerate(group.slices):
                kept = int((~p.removed[sl]).sum())
                assert kept == len(sl) or kept % group.round_to(k, 8) == 0
