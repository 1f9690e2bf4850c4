"""Spatial aura entropy and mutual information as channel importance (Musat & Andonie, "Information Theoretic Pruning
of Coupled Channels in Deep Neural Networks" / spatial aura entropy for MI-based pruning, arXiv 2312.04926, 2023).

The paper measures the heterogeneity of activation maps over a spatial neighbourhood (spatial aura entropy) and uses
mutual information between a filter and the next layer as the pruning criterion. The full text was not available; the
reconstruction (papers.md section 4), with what carve adds marked *ours*:

* every channel's post-activation map is quantised to G levels at per-channel quantiles (estimated on the first
  images of the calibration set);
* the **aura matrix** of a map counts level pairs over the 4-neighbourhood: M(g, g') = sum_s sum_{t in N(s)}
  [q(s) = g][q(t) = g'];  P = M / sum M;  H_aura = -sum P log P (0 for a constant map);
* ``variant="entropy"`` (the cheap one): importance_i = E_x[H_aura(a_i(x))], averaged over images;
* ``variant="mi"`` (default): importance_i = sum_j I(X_i; Y_j), X_i the channel's map and Y_j the maps of the next
  layer's channels built on it. The joint comes from the **cross-aura** matrix, C(g, g') = sum_s sum_{t in {s} u N(s)}
  [q_X(s) = g][q_Y(t) = g'], accumulated over the calibration set. *Ours*: papers.md writes I = H(X) + H(Y) - H(X,Y)
  with aura entropies as H(X) and H(Y); that is not a mutual information (two independent noise maps would score
  high), so carve takes H(X) and H(Y) from the marginals of C, which makes I a true MI between X at s and Y around
  s (0 for independent maps, H for identical ones).
* *Ours*, to stay tractable on big layers: "built on it" = the ``top`` next-layer channels with the largest weight
  magnitude on channel i; at most ``positions`` spatial positions per image are used (seeded); a channel whose map
  feeds no convolution directly (e.g. a residual branch before its Add) is followed through per-channel ops and Adds
  to the next convolution; when there is none, its entropy score is used.

Everything is accumulated batch by batch: memory holds count tables, not activations.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.data.activations import PER_CHANNEL, activation_tensor, spatial_producers
from carve.pipeline.data.capture import capture
from carve.pipeline.data.datasets import Dataset
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria

NEIGHBOURS = ((0, 1), (1, 0), (0, -1), (-1, 0))


def quantile_edges(maps: np.ndarray, levels: int) -> np.ndarray:
    """Per-channel interior quantile edges (C x levels-1) from N x C x H x W maps."""
    c = maps.shape[1]
    v = np.moveaxis(maps, 1, 0).reshape(c, -1)
    if v.shape[1] > 20000:
        v = v[:, np.random.default_rng(0).choice(v.shape[1], 20000, replace=False)]
    qs = np.linspace(0, 1, levels + 1)[1:-1]
    return np.quantile(v, qs, axis=1).T.astype(np.float32)


def quantise(maps: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Level (0..G-1) of every value: the number of the channel's edges it exceeds."""
    return (maps[..., None] > edges[None, :, None, None, :]).sum(-1).astype(np.int64)


def shifted(q: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (q[s], q[s + (dy, dx)]) over the positions where both exist."""
    h, w = q.shape[-2:]
    ys, yt = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xt = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    return q[..., ys, xs], q[..., yt, xt]


def aura_matrices(q: np.ndarray, levels: int) -> np.ndarray:
    """Aura matrices of quantised maps ``q`` (... x H x W) -> (... x G x G)."""
    lead = q.shape[:-2]
    m = np.zeros((int(np.prod(lead, dtype=np.int64)), levels * levels))
    flat_id = np.arange(m.shape[0]).reshape(lead)
    for dy, dx in NEIGHBOURS:
        a, b = shifted(q, dy, dx)
        idx = (flat_id[..., None, None] * levels * levels + a * levels + b).ravel()
        m += np.bincount(idx, minlength=m.size).reshape(m.shape)
    return m.reshape(*lead, levels, levels)


def entropy(p: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    total = p.sum(axis=axes, keepdims=True)
    p = p / np.where(total > 0, total, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(axis=axes)


def aura_entropy(maps: np.ndarray, levels: int = 8, edges: np.ndarray | None = None) -> np.ndarray:
    """Spatial aura entropy of each N x C map (a constant map has 0)."""
    edges = quantile_edges(maps, levels) if edges is None else edges
    return entropy(aura_matrices(quantise(maps, edges), levels))


def mutual_information(joint: np.ndarray) -> np.ndarray:
    """I(X; Y) from joint count tables (... x G x G): H(X) + H(Y) - H(X, Y) with the joint's own marginals."""
    return entropy(joint.sum(-1), axes=(-1,)) + entropy(joint.sum(-2), axes=(-1,)) - entropy(joint)


class _EntropyMean:
    def __init__(self, edges: dict[str, np.ndarray], levels: int) -> None:
        self.edges, self.levels = edges, levels
        self.sum: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def update(self, name: str, value: np.ndarray, labels) -> None:
        h = aura_entropy(value, self.levels, self.edges[name])
        self.sum[name] = self.sum.get(name, 0) + h.sum(0)
        self.count[name] = self.count.get(name, 0) + len(value)

    def mean(self, name: str) -> np.ndarray:
        return self.sum[name] / self.count[name]


class _CrossAura:
    """Joint level counts of X channel i at s and Y channel pick[i, k] at t in {s} u N(s), per (i, k)."""

    def __init__(self, pairs, edges, levels: int, positions: int, seed: int) -> None:
        self.pairs = pairs  # list of (x_tensor, y_tensor, pick[Cx, top], stride)
        self.edges, self.levels, self.positions = edges, levels, positions
        self.rng = np.random.default_rng(seed)
        self.counts = [np.zeros((p[2].shape[0], p[2].shape[1], levels * levels)) for p in pairs]

    def update_batch(self, values: dict[str, np.ndarray], labels) -> None:
        g = self.levels
        for k, (xt, yt, pick, stride) in enumerate(self.pairs):
            qx = quantise(values[xt][:, :, ::stride, ::stride], self.edges[xt])
            qy = quantise(values[yt], self.edges[yt])
            h, w = min(qx.shape[2], qy.shape[2]), min(qx.shape[3], qy.shape[3])
            qx, qy = qx[:, :, :h, :w], qy[:, :, :h, :w]
            mask = None
            if h * w > self.positions:
                mask = np.zeros(h * w, dtype=bool)
                mask[self.rng.choice(h * w, self.positions, replace=False)] = True
                mask = mask.reshape(h, w)
            cx, top = pick.shape
            for dy, dx in ((0, 0), *NEIGHBOURS):
                a, _ = shifted(qx, dy, dx)  # X at s, Y at s + (dy, dx)
                _, bb = shifted(qy, dy, dx)
                if mask is not None:
                    m, _ = shifted(mask, dy, dx)
                    a, bb = a[:, :, m], bb[:, :, m]
                else:
                    a, bb = a.reshape(*a.shape[:2], -1), bb.reshape(*bb.shape[:2], -1)
                yb = bb[:, pick]  # N x Cx x top x P
                idx = (np.arange(cx * top).reshape(1, cx, top, 1) * g * g + a[:, :, None, :] * g + yb).ravel()
                self.counts[k] += np.bincount(idx, minlength=cx * top * g * g).reshape(cx, top, g * g)


def next_conv(analysis, tensor: str, depth: int = 8):
    """The regular Conv that reads ``tensor`` (directly, or after per-channel ops and residual Adds), with the tensor it
    reads; None if there is none."""
    model = analysis.model
    chan = analysis.tensors.get(tensor)
    if chan is None:
        return None
    for _ in range(depth):
        users = model.consumers.get(tensor, [])
        for u in users:
            if u.op_type == "Conv" and u.input[0] == tensor and model.is_const(u.input[1]):
                w = model.array(u.input[1])
                groups = next((a.i for a in u.attribute if a.name == "group"), 1)
                if groups == 1 and w.shape[1] == len(chan):
                    return u, tensor
        follow = [u for u in users if u.op_type in PER_CHANNEL | {"Add"}]
        if len(follow) != 1:
            return None
        tensor = follow[0].output[0]
        nxt = analysis.tensors.get(tensor)
        if nxt is None or len(nxt) != len(chan):
            return None
    return None


@criteria.register("aura")
class Aura(Criterion):
    description = "spatial aura entropy / MI with the next layer (Musat & Andonie 2023)"
    needs = frozenset({"activations"})
    tensor_kind = "post-activation"
    options = {"variant": "mi", "levels": 8, "top": 8, "positions": 256, "quantile_images": 32}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, data = ctx.analysis, ctx.calib
        levels = int(self.opts["levels"])
        sources = spatial_producers(an)
        x_of = {s.name: activation_tensor(an, s) for s in sources}
        # quantile edges from the first images
        head = Dataset(
            data.images, data.labels, data.name, data.preprocess, data._idx()[: int(self.opts["quantile_images"])]
        )
        pairs, y_tensors = [], {}
        if self.opts["variant"] == "mi":
            for s in sources:
                found = next_conv(an, x_of[s.name])
                if found is None:
                    continue
                conv, read = found
                w = np.abs(an.model.array(conv.input[1])).reshape(*an.model.array(conv.input[1]).shape[:2], -1).sum(-1)
                top = min(int(self.opts["top"]), w.shape[0])
                pick = np.argsort(-w, axis=0)[:top].T  # Cx x top: the strongest next-layer channels per channel
                conv_src = next(p for p in an.producers() if p.name == conv.name)
                y = activation_tensor(an, conv_src)
                xs, ys = an.model.shape(x_of[s.name]), an.model.shape(y)
                if not xs or not ys or ys[2] is None or xs[2] is None or xs[2] % ys[2]:
                    continue
                pairs.append((x_of[s.name], y, pick, xs[2] // ys[2], s.name))
                y_tensors[s.name] = y
        elif self.opts["variant"] != "entropy":
            from carve.pipeline.errors import CarveError

            raise CarveError(f"aura: unknown variant {self.opts['variant']!r}; valid: mi, entropy")
        names = sorted(set(x_of.values()) | {p[1] for p in pairs})
        edges = _Edges(levels)
        capture(ctx.model, names, head, edges)
        ent = _EntropyMean(edges.edges, levels)
        cross = _CrossAura([p[:4] for p in pairs], edges.edges, levels, int(self.opts["positions"]), ctx.seed)
        capture(ctx.model, names, data, [ent, cross], progress=ctx.progress)
        scores = np.full(an.n_elements, np.nan)
        for s in sources:
            scores[s.start : s.start + s.count] = ent.mean(x_of[s.name])
        for (_, _, _, _, name), counts in zip(pairs, cross.counts):
            s = next(p for p in sources if p.name == name)
            mi = mutual_information(counts.reshape(*counts.shape[:2], levels, levels)).sum(axis=1)
            scores[s.start : s.start + s.count] = mi
        ctx.extra["aura_tensors"] = {"read": x_of, "next_layer": y_tensors}
        return scores


class _Edges:
    def __init__(self, levels: int) -> None:
        self.edges: dict[str, np.ndarray] = {}
        self.levels = levels

    def update(self, name: str, value: np.ndarray, labels) -> None:
        if name not in self.edges:  # one batch is enough for the quantiles
            self.edges[name] = quantile_edges(value, self.levels)
