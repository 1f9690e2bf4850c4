"""Fold BatchNormalization into the Conv, ConvTranspose or Gemm before it (exact; :mod:`carve.pipeline.graph.fold`)."""

from __future__ import annotations

from carve.pipeline.graph import Model
from carve.pipeline.graph.fold import fold_batchnorms
from carve.pipeline.passes import Pass, PassContext, PassResult, passes


@passes.register("fold_bn")
class FoldBN(Pass):
    exact = True
    description = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        out, n, details = fold_batchnorms(model)
        return PassResult(out, n > 0, details, {"folded": n})
