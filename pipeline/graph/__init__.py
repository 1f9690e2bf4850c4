"""The graph layer: ONNX in and out, canonicalisation, channel analysis, plans, surgery, cost, rewrites, precision.

It imports nothing from the layers above it (runtime, data, pruning, measure, flows, cli) nor from plugins; see
docs/architecture.md. The names most code needs are re-exported here::

    from carve.pipeline.graph import Model, load, save
"""

from __future__ import annotations

from carve.pipeline.graph.io import atomic_write, check_output_path, from_proto, load, save
from carve.pipeline.graph.model import Model, attr, opset_of
from carve.pipeline.graph.shapes import check, infer_shapes, skeleton

__all__ = [
    "Model",
    "load",
    "from_proto",
    "save",
    "check",
    "check_output_path",
    "infer_shapes",
    "skeleton",
    "atomic_write",
    "attr",
    "opset_of",
]
