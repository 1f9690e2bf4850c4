"""Built-in importance criteria; importing this package registers them (one criterion family per module)."""

from . import magnitude, random  # noqa: F401
