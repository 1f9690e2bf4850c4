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

__version__ = "0.1.0"

from .errors import CarveError  # noqa: E402
from .graph import Model, load, save  # noqa: E402


def __getattr__(name: str):
    # The analysis and surgery modules are imported on first use.
    if name in ("analyse", "analyze", "ChannelAnalysis"):
        from . import channels

        return {"analyse": channels.analyse, "analyze": channels.analyse, "ChannelAnalysis": channels.ChannelAnalysis}[
            name
        ]
    if name in ("plan", "Plan"):
        from . import planning

        return getattr(planning, name)
    if name == "prune":
        from .surgery import prune

        return prune
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["__version__", "CarveError", "Model", "load", "save", "analyse", "analyze", "plan", "Plan", "prune"]
