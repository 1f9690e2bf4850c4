"""Built-in importance criteria; importing this package registers them (one criterion family per module)."""

from carve.plugins.criteria import apbm, aura, cep, edp, energy, fpgm, hrank, magnitude, random, simfp, slimming, taylor  # noqa: F401
