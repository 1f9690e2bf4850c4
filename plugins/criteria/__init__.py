"""Built-in importance criteria; importing this package registers them (one criterion family per module)."""

from . import apbm, fpgm, magnitude, random, simfp, slimming  # noqa: F401
