"""carve: channel pruning, low-rank decomposition and merging of CNNs on their ONNX graph, measured on real engines.

The Python API mirrors the command line::

    from pipeline import load, analyse, plan, prune, save

    model = load("r56.onnx")
    analysis = analyse(model)               # coupled channel groups, frozen channels with reasons
    p = plan(analysis, criterion="l1", ratio=0.5, round_to=8)
    pruned = prune(model, p)                # a new, physically smaller Model
    save(pruned, "r56_p.onnx")
"""

from __future__ import annotations

import importlib

from pipeline.errors import CarveError
from pipeline.graph import Model, load, save
from pipeline.version import __version__

# name -> (module, attribute): imported on first use, so `import pipeline` stays cheap
_LAZY = {
    "analyse": ("pipeline.graph.channels", "analyse"),
    "analyze": ("pipeline.graph.channels", "analyse"),
    "ChannelAnalysis": ("pipeline.graph.channels", "ChannelAnalysis"),
    "plan": ("pipeline.pruning.planner", "plan"),
    "Plan": ("pipeline.graph.plan", "Plan"),
    "prune": ("pipeline.graph.surgery", "prune"),
    "prune_model": ("pipeline.pruning.prune", "prune_model"),
    "PruneOptions": ("pipeline.pruning.prune", "PruneOptions"),
    "model_cost": ("pipeline.graph.cost", "model_cost"),
    "load_data": ("pipeline.data.datasets", "load_data"),
}


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)


__all__ = ["__version__", "CarveError", "Model", "load", "save", *_LAZY]
