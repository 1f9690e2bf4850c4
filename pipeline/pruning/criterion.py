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
    # ranks filters by their size as stored: on a graph whose BatchNormalization an exporter folded into the convs
    # that size carries BN's gamma / sigma, and the ranking is not the BN-kept graph's (prune warns; issue 26)
    reads_filter_scale: ClassVar[bool] = False

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


_THROUGH = {"Transpose", "Reshape", "Identity", "Cast", "Dropout", "Squeeze", "Unsqueeze", "Flatten"}


def consumer_scores(ctx: ScoreContext, fn) -> np.ndarray:
    """Element scores from the consumers' side, for the groups of a transformer: a residual stream under LayerNorm
    (what its channels weigh is mostly how the next layers read them, after the norm's scale) and attention heads
    (the output projection's rows a head feeds). ``fn`` of each consumer's weight columns (one row per input
    channel), multiplied by the |scale| of the LayerNorm they read through; 0 for every other element. Added to
    :func:`filter_scores` by the norm criteria, so a unit's score covers every weight it touches."""
    an = ctx.analysis
    out = np.zeros(an.n_elements)
    whole = {g.id for g in an.groups if g.inexact or any(s > 1 for s in g.spans)}
    if not whole:
        return out
    scale = _norm_scales(an)
    for rec in an.slice_records:
        if rec.role != "in" or int(an.unit_group[an.unit_of[rec.ids[0]]]) not in whole:
            continue
        w = np.moveaxis(an.model.array(rec.tensor), rec.axis, 0).astype(np.float64)
        cols = fn(w.reshape(w.shape[0], -1)) * _reading_scale(an, rec.node, scale, rec.ids)
        np.add.at(out, rec.ids, cols)
    return out


def _norm_scales(an) -> dict[str, np.ndarray]:
    """node -> |per-element scale| of every LayerNorm (and decomposed norm's scale Mul) the analysis cut."""
    out: dict[str, np.ndarray] = {}
    for rec in an.slice_records:
        node = an.model.nodes.get(rec.node)
        if rec.role != "param" or node is None or rec.tensor != (node.input[1] if len(node.input) > 1 else None):
            continue
        if node.op_type not in ("LayerNormalization", "Mul"):
            continue
        v = np.moveaxis(np.abs(an.model.array(rec.tensor)).astype(np.float64), rec.axis, 0).reshape(len(rec.ids), -1)
        arr = np.full(an.n_elements, np.nan)
        arr[rec.ids] = v.mean(axis=1)
        out[rec.node] = arr
    return out


def _reading_scale(an, node_name: str, scale: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The norm scale the consumer ``node_name`` reads its input through (1 where there is none)."""
    model = an.model
    t = model.nodes[node_name].input[0]
    for _ in range(8):
        p = model.producer.get(t)
        if p is None:
            break
        if p.name in scale:
            s = scale[p.name][ids]
            return np.where(np.isnan(s), 1.0, s)
        if p.op_type in _THROUGH or (p.op_type == "Add" and any(model.is_const(i) for i in p.input)):
            t = next(i for i in p.input if not model.is_const(i))
            continue
        break
    return np.ones(len(ids))


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
