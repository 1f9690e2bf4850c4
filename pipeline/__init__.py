"""carve's mechanism, installed as ``carve.pipeline``: the graph and its channel analysis, surgery, passes, runtime,
data, pruning, training, measurement, flows and the command line. Layers and their rules: docs/architecture.md. The
public Python API is :mod:`carve` itself."""
