"""EDP: coefficient norms as the importance of decomposed channels (Efficient Decomposition and Pruning, IEEE TNNLS
32(10):4499-4513, 2021).

EDP regularises the coefficient layer of its compressed-aware block so that whole coefficient columns vanish; the
channels whose coefficients are small are pruned. On a model produced by ``carve decompose`` (basis conv -> 1x1
coefficient conv, A = U_r S_r^1/2):

* a basis conv's channel k scores ||A[:, k]||_2, the norm of its column in the coefficient matrix (how much the
  layer's output depends on it);
* a coefficient conv's output channel o, like any other layer's, scores its row norm ||A[o, :]||_2;
* layers that were not decomposed score the L2 norm of their filters, so a partly decomposed model is still ranked
  consistently.
"""

from __future__ import annotations

import numpy as np

from carve.pipeline.pruning.criterion import Criterion, ScoreContext, criteria


def coefficient_consumer(model, node):
    """The 1x1 coefficient conv (or MatMul/Gemm after a linear basis) that alone reads a basis layer's output, or
    None."""
    users = model.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].input[0] != node.output[0]:
        return None
    w = model.shape(users[0].input[1])
    if users[0].op_type in ("MatMul", "Gemm") and node.op_type == users[0].op_type:
        return users[0] if w is not None and len(w) == 2 and model.is_const(users[0].input[1]) else None
    if users[0].op_type != "Conv":
        return None
    return users[0] if w is not None and tuple(w[2:]) == (1, 1) else None


def coefficients(model, coeff) -> np.ndarray:
    """The coefficient matrix A (Cout x r) of a coefficient layer."""
    w = model.array(coeff.input[1]).astype(np.float64)
    if coeff.op_type == "Conv":
        return w[:, :, 0, 0]
    return w if coeff.op_type == "Gemm" and coeff_trans_b(coeff) else w.T


def coeff_trans_b(node) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


@criteria.register("edp")
class EDP(Criterion):
    description = "coefficient-column norms for decomposed (basis) channels, filter norms elsewhere (EDP 2021)"

    def element_scores(self, ctx: ScoreContext) -> np.ndarray:
        an, model = ctx.analysis, ctx.model
        scores = np.full(an.n_elements, np.nan)
        for src in an.producers():
            node = model.nodes[src.name]
            coeff = coefficient_consumer(model, node) if node.name.endswith("_basis") else None
            if coeff is not None:
                a = coefficients(model, coeff)  # Cout x r
                s = np.linalg.norm(a, axis=0)
            else:
                s = np.linalg.norm(an.filters(src).astype(np.float64), axis=1)
            scores[src.start : src.start + src.count] = s
        return scores
