"""A pruning plan: which channel units to remove from an analysed model. Plain data that surgery
(:mod:`carve.pipeline.graph.surgery`) takes; the planner that makes one from importance scores is
:func:`carve.pipeline.pruning.planner.plan`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carve.pipeline.graph.channels import ChannelAnalysis, Kind
from carve.pipeline.graph.cost import model_cost


@dataclass
class Plan:
    analysis: ChannelAnalysis
    removed: np.ndarray  # bool per unit
    criterion: str = "manual"
    allocator: str = "manual"
    options: dict[str, Any] = field(default_factory=dict)
    scores: np.ndarray | None = None
    frozen: np.ndarray | None = None  # frozen mask used (analysis + --exclude)

    @property
    def n_removed(self) -> int:
        return int(self.removed.sum())

    def removed_channels(self) -> int:
        """Producer output channels removed (what a user calls 'channels')."""
        a = self.analysis
        return sum(int(self.removed[a.source_units(s)].sum()) for s in a.sources if s.kind == Kind.OUT)

    def counts(self) -> dict[str, int]:
        """Output channels before, and channels, units and groups the plan removes."""
        a = self.analysis
        return {
            "channels_before": sum(s.count for s in a.sources if s.kind == Kind.OUT),
            "channels_removed": self.removed_channels(),
            "units_removed": self.n_removed,
            "groups_touched": int(len(np.unique(a.unit_group[self.removed]))) if self.n_removed else 0,
        }

    def summary(self, model_before=None, model_after=None, cost_before=None, cost_after=None) -> dict:
        """The plan as a history entry of raw surgery (:func:`carve.pipeline.graph.surgery.prune`): criterion,
        allocator, options, counts and, when given, the cost before and after."""
        out: dict[str, Any] = {
            "criterion": self.criterion,
            "allocator": self.allocator,
            "options": self.options,
            **self.counts(),
        }
        c0 = cost_before or (model_cost(model_before) if model_before is not None else None)
        c1 = cost_after or (model_cost(model_after) if model_after is not None else None)
        if c0 is not None:
            out.update(params_before=c0.params, macs_before=c0.macs)
            if c1 is not None:
                out.update(params_after=c1.params, macs_after=c1.macs)
        return out
