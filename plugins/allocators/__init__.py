"""Built-in allocators: how many units each slice of each group loses (one allocator per module)."""

from carve.plugins.allocators import dispersion, global_rank, knapsack, uniform  # noqa: F401
