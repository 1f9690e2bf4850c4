"""One handler per op type (see :mod:`carve.pipeline.graph.channels`); importing this package fills :data:`HANDLERS`."""

from carve.pipeline.graph.channels.handlers import pointwise, producers, shape, structure  # noqa: F401  (register)
from carve.pipeline.graph.channels.handlers.table import HANDLERS, handles, q, unknown

__all__ = ["HANDLERS", "handles", "q", "unknown"]
