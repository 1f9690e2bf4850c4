"""Built-in passes (one concept per module); importing this package registers them."""

from carve.plugins.passes import decompose, finetune, fold_bn, gradual, merge, prune, quantize, sparsify  # noqa: F401
