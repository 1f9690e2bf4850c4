"""Built-in passes (one concept per module); importing this package registers them."""

from . import decompose, fold_bn, merge, prune  # noqa: F401
