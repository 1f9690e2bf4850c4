"""Built-in repairs (one method per module); importing this package registers them."""

from carve.plugins.repairs import bias, bn, fuse, lsq  # noqa: F401
