"""Named plugin registries: a decorator for built-ins, entry points for third parties.

    criteria = Registry("criterion", entry_point_group="carve.criteria")

    @criteria.register("l1")
    class L1: ...

    criteria.get("l1")      # -> L1
    criteria.get("l3")      # CarveError: unknown criterion 'l3'; valid: l1, l2, random

Built-in plugins are imported lazily from the modules named in ``builtin_modules`` the first time a registry is read, so
importing :mod:`pipeline` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any, ClassVar, Generic, TypeVar

from carve.pipeline.config import check_value, coerce
from carve.pipeline.errors import CarveError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, *, entry_point_group: str | None = None, builtin_modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_modules = tuple(builtin_modules)
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")``."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            with contextlib.suppress(AttributeError, TypeError):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self._builtin_modules:
            importlib.import_module(mod)
        if self.entry_point_group:
            for ep in entry_points(group=self.entry_point_group):
                if ep.name in self._items:
                    continue
                try:
                    self._items[ep.name] = ep.load()
                except Exception as exc:  # a broken third-party plugin must not break the built-ins
                    raise CarveError(
                        f"the {self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                        hint=f"fix or uninstall the package providing it (entry point group {self.entry_point_group})",
                    ) from exc

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise CarveError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def __contains__(self, name: Any) -> bool:
        self._load()
        return name in self._items


class Plugin:
    """Base of plugins configured by keyword options (criteria, allocators, repairs): ``options`` lists the accepted
    ones with their defaults; an unknown option is a user error naming the valid ones. A value is coerced to its
    default's type (a number, a flag, a string) and checked against ``limits`` (:func:`carve.pipeline.config.bounds`
    per option), or refused naming the plugin and the option. ``self.opts`` holds the merged values, ``self.given``
    the ones chosen."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "plugin"
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    limits: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.options)
        if unknown:
            valid = ", ".join(sorted(self.options)) or "none"
            raise CarveError(f"{self.kind} {self.name!r} has no option {sorted(unknown)[0]!r}; its options: {valid}")
        for key, value in options.items():
            where = f"{self.kind} {self.name!r}: {key}"
            default = self.options[key]
            if value is not None and type(default) in (bool, int, float, str):
                value = options[key] = coerce(value, type(default), where=where)
            check_value(value, self.limits.get(key, {}), where=where)
        self.given = dict(options)  # as chosen (what a plan or a report records)
        self.opts = {**self.options, **options}
