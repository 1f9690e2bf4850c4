"""The importance-criterion interface and its registry.

A criterion scores channel **elements** (see :mod:`carve.pipeline.graph.channels`); a unit's score is the sum of its
elements' scores, so a channel shared by several producers (a residual stream) aggregates all of them consistently. A
criterion declares what it needs (``weights``, ``activations``, ``labels``, ``gradients``) so the CLI can ask for
calibration data and ``carve plugins`` can list it. Lower score = less important = removed first.

Register a criterion with the decorator (built-ins live in ``plugins/criteria/``), or from another package through the
``carve.criteria`` entry-point group::

    @criteria.register("l1")
    class L1(Criterion): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from carve.pipeline.graph.channels import ChannelAnalysis
from carve.pipeline.registry import Plugin, Registry

criteria: Registry[type[Criterion]] = Registry(
    "criterion", entry_point_group="carve.criteria", builtin_modules=["carve.plugins.criteria"]
)


@dataclass
class ScoreContext:
    analysis: ChannelAnalysis
    seed: int = 0
    calib: Any = None  # calibration data, for criteria that need activations/labels/gradients
    extra: dict[str, Any] = field(default_factory=dict)
    progress: Any = None  # a carve.pipeline.progress.Progress callback for long scoring (activation capture)

    @property
    def model(self):
        return self.analysis.model

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class Criterion(Plugin):
    """Base class: override :meth:`element_scores` (or :meth:`unit_scores` when scoring whole units)."""

    kind: ClassVar[str] = "criterion"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        raise NotImplementedError

    def unit_scores(self, ctx: ScoreContext) -> np.ndarray:
        return ctx.analysis.unit_scores(self.element_scores(ctx))


def filter_scores(ctx: ScoreContext, fn) -> np.ndarray:
    """Element scores from a function of each producer's 2-D filter matrix (one row per output channel)."""
    scores = np.full(ctx.analysis.n_elements, np.nan)
    for src in ctx.analysis.producers():
        scores[src.start : src.start + src.count] = fn(ctx.analysis.filters(src).astype(np.float64))
    return scores


def get(name: str, **options: Any) -> Criterion:
    return criteria.get(name)(**options)


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``x`` (via the Gram matrix: O(n^2 d) in one matmul)."""
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def cosine_distances(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / np.where(n > 0, n, 1.0)
    d = 1.0 - u @ u.T
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d
