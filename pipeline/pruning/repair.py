"""Post-training repair between planning and surgery: the contract and its registry.

A repair works on the *working* model: the original with the plan's removed consumer columns zeroed (which computes
exactly what the pruned model will compute). It may change the consumers' kept columns and biases, or statistics such
as BatchNorm's, but never which channels go. Surgery then cuts the working model, and verification checks that the
pruned model equals it. Repairs run in the order given; each sees the previous one's working model.

    @repairs.register("lsq")
    class LeastSquares(Repair):
        needs = frozenset({"calib"})
        options = {"ridge": 1e-3}

        def apply(self, original, plan, working, calib, *, progress=None) -> RepairResult: ...

``progress`` (:class:`carve.pipeline.progress.Progress`), when given, is told how many of the layers the repair works
on are done, as ``progress(f"{self.name}: layer", done, total)`` (shown as ``lsq: layer 12/55``); a repair calls it as
often as it has news, at least at the end.

Built-ins live in ``plugins/repairs/`` (``exact`` fusion, ``lsq``, ``bias``, ``bn``); third parties register through
the ``carve.repairs`` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from carve.pipeline.graph.model import Model
from carve.pipeline.graph.plan import Plan
from carve.pipeline.progress import Progress
from carve.pipeline.registry import Plugin, Registry


@dataclass
class RepairResult:
    model: Model  # the repaired working model
    details: list[str] = field(default_factory=list)  # one line per decision, for reports
    stats: dict[str, Any] = field(default_factory=dict)


class Repair(Plugin):
    kind: ClassVar[str] = "repair"
    needs: ClassVar[frozenset[str]] = frozenset()  # {"calib"} when it reads calibration data

    def apply(
        self,
        original: Model,
        plan: Plan,
        working: Model,
        calib: Any = None,
        *,
        progress: Progress | None = None,
    ) -> RepairResult:  # pragma: no cover - interface
        raise NotImplementedError


repairs: Registry[type[Repair]] = Registry(
    "repair", entry_point_group="carve.repairs", builtin_modules=["carve.plugins.repairs"]
)
