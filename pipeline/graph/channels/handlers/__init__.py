"""One handler per op type (see :mod:`carve.pipeline.graph.channels`); importing this package fills :data:`HANDLERS`."""

from carve.pipeline.graph.channels.handlers import (  # noqa: F401  (register)
    attention,
    pointwise,
    producers,
    shape,
    structure,
)
from carve.pipeline.graph.channels.handlers.table import HANDLERS, dispatch, handles, q, unknown

__all__ = ["HANDLERS", "dispatch", "handles", "q", "unknown"]
