"""SFP: similarity-based filter pruning (Information Sciences 2024, art. 121418, doi 10.1016/j.ins.2024.121418).

The paper clusters kernels by similarity, prunes the redundant and the unimportant kernels of each cluster, and sets
per-layer sparsity from the kernel dispersion; carve calls it ``simfp`` to avoid a clash with Soft Filter Pruning.
The full text was not available; this is the reconstruction of papers.md section 5:

* BN-folded filters of a layer are clustered agglomeratively by cosine distance (scikit-learn, average linkage);
* in every cluster the best member (largest norm) is kept and the others are redundant;
* clusters whose best member is unimportant (norm < ``tau`` x the layer's largest norm) are pruned.

Ours, to make it a ranking any allocator can use: agglomerative merges happen in non-decreasing distance order, and
cutting the tree at k clusters undoes exactly the n-k earliest merges. So each filter scores the merge distance at
which it stopped being its cluster's best member (the layer's overall best scores above every distance); keeping the
k highest scores keeps exactly the k cluster representatives. An exact duplicate or positive multiple of a stronger
filter merges at distance 0 and goes first. Filters under ``tau`` score below everything else.

:func:`carve.pipeline.pruning.scoring.kernel_dispersion` (mean pairwise cosine distance of a layer's filters) feeds
the ``dispersion`` allocator.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.graph.bn import folded_filters
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, cosine_distances, criteria


def redundancy_scores(w: np.ndarray, linkage: str = "average") -> np.ndarray:
    """Merge distance at which each filter stops being its cluster's best (largest-norm) member."""
    from sklearn.cluster import AgglomerativeClustering

    n = len(w)
    norms = np.linalg.norm(w, axis=1)
    if n < 2:
        return np.full(n, 2.0)
    nonzero = norms > 0
    d = cosine_distances(w)
    d[~nonzero, :] = 0.0  # a zero filter is redundant with anything
    d[:, ~nonzero] = 0.0
    np.fill_diagonal(d, 0.0)
    model = AgglomerativeClustering(
        n_clusters=1, metric="precomputed", linkage=linkage, compute_full_tree=True, compute_distances=True
    )
    model.fit(d)
    best = list(range(n))  # best member of each tree node (leaves first, then merges)
    lost = np.full(n, 2.0 + 1e-6)  # the overall best never loses
    for k, (a, b) in enumerate(model.children_):
        ra, rb = best[a], best[b]
        win, lose = (ra, rb) if (norms[ra], -ra) >= (norms[rb], -rb) else (rb, ra)
        lost[lose] = model.distances_[k]
        best.append(win)
    return lost


@criteria.register("simfp")
class SimFP(Criterion):
    description = "cluster BN-folded filters by cosine similarity, keep each cluster's best (SFP, Inf. Sci. 2024)"
    options = {"tau": 0.0, "linkage": "average"}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an = ctx.analysis
        scores = np.full(an.n_elements, np.nan)
        for src in an.producers():
            w = folded_filters(an, src)
            s = redundancy_scores(w, self.opts["linkage"])
            # a small norm term breaks ties between equally redundant filters (weaker first)
            norms = np.linalg.norm(w, axis=1)
            s = s + 1e-9 * norms / max(float(norms.max()), 1e-30)
            if self.opts["tau"] > 0:
                s[norms < self.opts["tau"] * norms.max()] = -1.0
            scores[src.start : src.start + src.count] = s
        return scores
