"""APBM: information-fusion pruning by the relative entropy of kernel similarity distributions.

Paper: "information fusion pruning" (Computer Engineering and Applications 58(24):125-133, 2022,
doi 10.3778/j.issn.1002-8331.2203-0289): the information entropy of each kernel's similarity distribution and the sum
of relative entropies (KL divergences) as importance; unimportant kernels are fused into important ones. The full text
was not available; the formulation follows its likely parent DCFF (Lin et al., arXiv 2107.06916), as reconstructed in
papers.md section 3:

    D_ij = ||w_i - w_j||              (BN-folded filters of one layer)
    p_i  = softmax_j(-D_ij / t)       (kernel i's similarity distribution, temperature t)
    H_i  = -sum_k p_i(k) log p_i(k)   (its information entropy)
    KL_ij = sum_k p_i(k) log(p_i(k) / p_j(k))
    score_i = sum_j KL_ij             (a kernel whose distribution differs from the others' carries information)

Ours: carve applies it post-training at a fixed temperature, t = ``temperature`` x the median off-diagonal distance
of the layer (DCFF anneals t during training), and sums the per-layer scores over the producers of a channel unit.
The O(n^3) double sum is computed in O(n^2): sum_j KL_ij = n sum_k p_ik log p_ik - sum_k p_ik sum_j log p_jk.
The fusion half (folding a pruned kernel into the kept ones) is the ``fuse`` pass.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.graph.bn import folded_filters
from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria, pairwise_distances


def similarity_distributions(w: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row i: softmax over j of -||w_i - w_j|| / t, t = temperature x median off-diagonal distance."""
    d = pairwise_distances(w)
    n = len(w)
    off = d[~np.eye(n, dtype=bool)]
    t = temperature * (float(np.median(off)) if off.size and np.median(off) > 0 else 1.0)
    logits = -d / t
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)


def kl_importance(p: np.ndarray) -> np.ndarray:
    """score_i = sum_j KL(p_i || p_j), in O(n^2)."""
    logp = np.log(np.clip(p, 1e-300, None))
    n = len(p)
    return n * (p * logp).sum(axis=1) - p @ logp.sum(axis=0)


@criteria.register("apbm")
class APBM(Criterion):
    description = "sum of KL divergences between kernel similarity distributions (information fusion pruning, 2022)"
    options = {"temperature": 1.0}

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an = ctx.analysis
        scores = np.full(an.n_elements, np.nan)
        entropies = {}
        for src in an.producers():
            if src.count < 2:
                scores[src.start] = 0.0
                continue
            p = similarity_distributions(folded_filters(an, src), self.opts["temperature"])
            scores[src.start : src.start + src.count] = kl_importance(p)
            entropies[src.name] = entropy(p)
        ctx.extra["apbm_entropy"] = entropies
        return scores
