"""Built-in passes (one concept per module); importing this package registers them."""

from plugins.passes import decompose, fold_bn, merge, prune, sparsify  # noqa: F401
