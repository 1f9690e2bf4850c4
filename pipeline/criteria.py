"""The importance-criterion interface and its registry.

A criterion scores channel **elements** (see :mod:`pipeline.channels`); a unit's score is the sum of its elements'
scores, so a channel shared by several producers (a residual stream) aggregates all of them consistently. A criterion
declares what it needs (``weights``, ``activations``, ``labels``, ``gradients``) so the CLI can ask for calibration data
and ``carve plugins`` can list it. Lower score = less important = removed first.

Register a criterion with the decorator (built-ins live in ``plugins/criteria/``), or from another package through the
``carve.criteria`` entry-point group::

    @criteria.register("l1")
    class L1(Criterion): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .channels import ChannelAnalysis
from .errors import CarveError
from .registry import Registry

criteria: Registry[type[Criterion]] = Registry(
    "criterion", entry_point_group="carve.criteria", builtin_modules=["plugins.criteria"]
)


@dataclass
class ScoreContext:
    analysis: ChannelAnalysis
    seed: int = 0
    calib: Any = None  # calibration data, for criteria that need activations/labels/gradients
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self):
        return self.analysis.model

    @property
    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


class Criterion:
    """Base class: override :meth:`element_scores` (or :meth:`unit_scores` when scoring whole units)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}  # accepted options and their defaults

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise CarveError(f"criterion {self.name!r} has no option {sorted(unknown)[0]!r}; its options: {valid}")
        self.opts = {**self.options, **options}

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


def following_bn(model, tensor: str):
    """The BatchNormalization node that alone reads ``tensor`` (a producer's output), or None."""
    users = model.consumers.get(tensor, [])
    if len(users) == 1 and users[0].op_type == "BatchNormalization" and users[0].input[0] == tensor:
        return users[0]
    return None


def bn_scale_shift(model, bn) -> tuple[np.ndarray, np.ndarray]:
    """y = scale * x + shift for an inference-mode BatchNormalization node."""
    from .graph import attr

    gamma, beta, mean, var = (model.array(i).astype(np.float64) for i in bn.input[1:5])
    scale = gamma / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return scale, beta - mean * scale


def folded_filters(analysis: ChannelAnalysis, source, *, with_bias: bool = False) -> np.ndarray:
    """A producer's filters with the BatchNormalization that follows it folded in (rows = output channels).

    ``with_bias`` appends the folded bias as a last column: the augmented filter [w; b] of papers.md section 6.
    """
    model = analysis.model
    w = analysis.filters(source).astype(np.float64)
    node = model.nodes[source.name]
    b = np.zeros(len(w))
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        b = model.array(node.input[2]).astype(np.float64)
    elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = model.array(node.input[2]).astype(np.float64)
        b = np.broadcast_to(c.reshape(-1) if c.size == len(w) else c.reshape(-1)[:1], (len(w),)).copy()
    bn = following_bn(model, node.output[0])
    if bn is not None and model.shape(bn.input[1]) == (len(w),) and all(model.is_const(i) for i in bn.input[1:5]):
        scale, shift = bn_scale_shift(model, bn)
        w = w * scale[:, None]
        b = b * scale + shift
    return np.concatenate([w, b[:, None]], axis=1) if with_bias else w


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
