"""carve: channel pruning, low-rank decomposition and merging of neural networks on their ONNX graph, measured on real
engines.

Everything carve installs lives under this one name: ``carve.pipeline`` (the mechanism: graph, analysis, surgery,
passes, measurement, flows, the CLI), ``carve.plugins`` (the policy: criteria, allocators, repairs, passes) and
``carve.models`` (the model zoo). The Python API mirrors the command line::

    from carve import Target, Widths, analyse, load, plan, prune, save

    model = load("r56.onnx")
    analysis = analyse(model)               # coupled channel groups, frozen channels with reasons
    p = plan(analysis, Target("macs", 0.5), scores="l1", widths=Widths(round_to=8))
    pruned = prune(model, p)                # a new, physically smaller Model
    save(pruned, "r56_p.onnx")
"""

from __future__ import annotations

import importlib

from carve.pipeline.errors import CarveError
from carve.pipeline.graph import Model, load, save
from carve.pipeline.version import __version__

# name -> (module, attribute): imported on first use, so `import carve` stays cheap
_LAZY = {
    "analyse": ("carve.pipeline.graph.channels", "analyse"),
    "analyze": ("carve.pipeline.graph.channels", "analyse"),
    "ChannelAnalysis": ("carve.pipeline.graph.channels", "ChannelAnalysis"),
    "plan": ("carve.pipeline.pruning.planner", "plan"),
    "score": ("carve.pipeline.pruning.planner", "score"),
    "Scores": ("carve.pipeline.pruning.planner", "Scores"),
    "Widths": ("carve.pipeline.pruning.planner", "Widths"),
    "Target": ("carve.pipeline.pruning.targets", "Target"),
    "Plan": ("carve.pipeline.graph.plan", "Plan"),
    "prune": ("carve.pipeline.graph.surgery", "prune"),
    "prune_model": ("carve.pipeline.pruning.prune", "prune_model"),
    "PruneOptions": ("carve.pipeline.pruning.prune", "PruneOptions"),
    "PruneReport": ("carve.pipeline.pruning.report", "PruneReport"),
    "model_cost": ("carve.pipeline.graph.cost", "model_cost"),
    "load_data": ("carve.pipeline.data.datasets", "load_data"),
    "finetune": ("carve.pipeline.training.finetune", "finetune"),
    "FinetuneOptions": ("carve.pipeline.training.finetune", "FinetuneOptions"),
    "quantize": ("carve.pipeline.flows.quantize", "quantize_model"),
    "quantize_file": ("carve.pipeline.flows.quantize", "quantize_file"),
}


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'carve' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)


__all__ = ["__version__", "CarveError", "Model", "load", "save", *_LAZY]
