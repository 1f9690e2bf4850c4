"""Post-training repair between planning and surgery: the contract and its registry.

A repair works on the *working* model: the original with the plan's removed consumer columns zeroed (which computes
exactly what the pruned model will compute). It may change the consumers' kept columns and biases, or statistics such
as BatchNorm's, but never which channels go. Surgery then cuts the working model, and verification checks that the
pruned model equals it. Repairs run in the order given; each sees the previous one's working model (its
inputs carry the earlier repairs) but fits against the *original's* outputs and parameters, so a chain never does
worse on its data than its last refit alone (``lsq`` then ``bias`` corrects what the refit left, not the refit).

    @repairs.register("lsq")
    class LeastSquares(Repair):
        needs = frozenset({"calib"})
        options = {"ridge": 1e-3}

        def apply(self, original, plan, working, calib, *, progress=None) -> RepairResult: ...

``progress`` (:class:`carve.pipeline.progress.Progress`), when given, is told how many of the layers the repair works
on are done, as ``progress(f"{self.name}: layer", done, total)`` (shown as ``lsq: layer 12/55``); a repair calls it as
often as it has news, at least at the end.

Built-ins live in ``plugins/repairs/`` (``exact`` fusion, ``lsq``, ``bias``, ``bn``); third parties register through
the ``carve.repairs`` entry-point group. What to run is an ordered list of :class:`RepairStep` (a registry name and its
options), read by :func:`parse_repairs` from what users write: ``[lsq, {bn: {}}]`` in a recipe, ``lsq+bn`` on a sweep
axis, ``--repair lsq --repair bn --repair-opt ridge=1e-2`` on the command line. A repair that needs a bias on every
consumer it changes (a refit's intercept) says so with ``needs = {"biases"}``; one that reads data with ``"calib"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from carve.pipeline.errors import CarveError
from carve.pipeline.graph.model import Model
from carve.pipeline.graph.plan import Plan
from carve.pipeline.progress import Progress
from carve.pipeline.registry import Plugin, Registry


@dataclass
class RepairResult:
    model: Model  # the repaired working model
    details: list[str] = field(default_factory=list)  # one line per decision, for reports
    stats: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] | None = None  # what the prune report records (default: {name: decisions made})


class Repair(Plugin):
    kind: ClassVar[str] = "repair"
    # {"calib"}: it reads calibration data; {"biases"}: every consumer it changes must have a bias to change
    needs: ClassVar[frozenset[str]] = frozenset()

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


@dataclass(frozen=True, eq=True)
class RepairStep:
    """One repair to run: its registry name and the options it is built with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def build(self) -> Repair:
        return repairs.get(self.name)(**self.options)

    def spell(self) -> str:
        """``lsq`` or ``lsq(ridge=0.01)``: the step in a sweep point's id and in messages."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.name}({opts})" if opts else self.name

    def to_json(self) -> str | dict[str, dict[str, Any]]:
        """As a recipe writes it: the name, or ``{name: {options}}``."""
        return {self.name: dict(self.options)} if self.options else self.name


def parse_repairs(value: Any, *, where: str) -> list[RepairStep]:
    """Repairs as users write them, in order: ``None``, ``none`` or ``[]`` (no repair); a name or ``lsq+bn``; a list
    whose items are names or ``{name: {options}}``. Every name must be registered and every option known to its
    repair (checked by building it); errors name ``where``."""
    if value is None:
        return []
    if isinstance(value, RepairStep):
        value = [value]
    if isinstance(value, str):
        value = [] if value.strip() in ("", "none") else value.split("+")
    if isinstance(value, dict):
        value = [{k: v} for k, v in value.items()]
    if not isinstance(value, list | tuple):
        raise CarveError(f"{where}: expected a list of repairs (names or {{name: {{options}}}}), got {value!r}")
    steps = []
    for item in value:
        if isinstance(item, RepairStep):
            step = item
        elif isinstance(item, str):
            step = RepairStep(item.strip())
        elif isinstance(item, dict) and len(item) == 1:
            ((name, opts),) = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise CarveError(f"{where}: the options of repair {name!r} must be a mapping, got {opts!r}")
            step = RepairStep(str(name), dict(opts or {}))
        else:
            raise CarveError(f"{where}: a repair is a name or {{name: {{options}}}}, got {item!r}")
        try:
            built = step.build()
        except CarveError as exc:
            raise CarveError(f"{where}: {exc.message}", hint=exc.hint) from None
        steps.append(RepairStep(step.name, dict(built.given)))
    return steps


def with_options(steps: list[RepairStep], options: dict[str, Any], *, where: str) -> list[RepairStep]:
    """``steps`` with ``options`` added: a key ``name.option`` goes to that repair, a bare ``option`` to the one
    repair of ``steps`` that declares it (an error when none or several do)."""
    out = [RepairStep(s.name, dict(s.options)) for s in steps]
    for key, value in options.items():
        name, _, opt = key.rpartition(".")
        if name:
            matches = [s for s in out if s.name == name]
            if not matches:
                raise CarveError(f"{where} {key}={value}: no repair {name!r} is chosen")
        else:
            matches = [s for s in out if opt in repairs.get(s.name).options]
            if len(matches) != 1:
                chosen = ", ".join(s.name for s in out) or "none"
                what = "none of the chosen repairs" if not matches else "several chosen repairs"
                raise CarveError(
                    f"{where} {key}={value}: {what} take(s) an option {opt!r} (chosen: {chosen})",
                    hint="write NAME.OPTION=VALUE, e.g. lsq.ridge=1e-2; `carve plugins` lists every option",
                )
        for s in matches:
            s.options[opt] = value
    return parse_repairs(out, where=where)
