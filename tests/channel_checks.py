"""What the channel-analysis tests (tests/test_channels_*.py, one file per handler family) share: prune with random
plans and check exactness, assert a tensor is frozen for a stated reason, and look up groups and reasons."""

from __future__ import annotations

import numpy as np
from graphs import G, analyse_proto, assert_exact, manual_plan, random_removal

from carve.pipeline.graph.channels import Kind


def prune_randomly(model, analysis, seeds=(0, 1, 2), p=0.5):
    out = None
    for s in seeds:
        removed = random_removal(analysis, np.random.default_rng(s), p)
        out = assert_exact(model, manual_plan(analysis, removed))
    return out


def assert_frozen(g: G, outputs: list[str], tensor: str, reason: str, *, prune: bool = True):
    """Analyse ``g``: ``tensor``'s channels are all frozen, for a reason that contains ``reason``; the rest still
    prunes exactly (when ``prune``)."""
    model, an = analyse_proto(g.model(outputs))
    assert reason in reasons(an)
    assert an.unit_frozen[an.units_of_tensor(tensor)].all()
    if prune:
        prune_randomly(model, an)
    return model, an


def group_of(analysis, node: str) -> int:
    src = next(s for s in analysis.sources if s.name == node and s.kind in (Kind.OUT, Kind.MEMBER))
    groups = {int(analysis.unit_group[u]) for u in analysis.source_units(src)}
    assert len(groups) == 1
    return groups.pop()


def node_of(g: G, out: str) -> str:
    return next(n.name for n in g.nodes if out in n.output)


def reasons(analysis) -> str:
    return " | ".join(r for rs in analysis.unit_reasons.values() for r in rs)
