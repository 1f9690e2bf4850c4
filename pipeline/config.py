"""Settings dataclasses built from a mapping (a recipe's section, a sweep axis) or from parsed command-line arguments,
with one validation: unknown keys are errors that name the key and the valid ones, and values are coerced to the
field's declared type (``int``, ``float``, ``bool``, ``str``, ``list[int]``, optional fields) or refused with a
message that names where the value came from.

    cfg = from_mapping(MeasureConfig, recipe["bench"], where="r.yaml: bench", only={"backend", "batch", ...})
    opts = from_args(PruneOptions, args)      # argparse destinations are named like the fields
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from carve.pipeline.errors import CarveError

T = TypeVar("T")


def bounds(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """Field metadata: the values a setting may take (``field(default=1, metadata=bounds(ge=1))``)."""
    b = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if choices is not None:
        b["choices"] = tuple(choices)
    return {"bounds": b}


def check_value(value: Any, metadata: Mapping[str, Any], *, where: str) -> None:
    """``value`` (or each item of a list) within the bounds of a field's metadata, else a CarveError naming
    ``where``."""
    b = metadata.get("bounds")
    if not b or value is None:
        return
    for v in value if isinstance(value, list | tuple) else [value]:
        if "choices" in b and v not in b["choices"]:
            raise CarveError(f"{where} must be one of {', '.join(map(str, b['choices']))}; got {v!r}")
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        for key, ok, text in (
            ("ge", lambda x, y: x >= y, "at least"),
            ("gt", lambda x, y: x > y, "above"),
            ("le", lambda x, y: x <= y, "at most"),
            ("lt", lambda x, y: x < y, "below"),
        ):
            if key in b and not ok(v, b[key]):  # NaN fails every comparison
                raise CarveError(f"{where} must be {text} {b[key]:g}; got {v!r}")


def option(name: str) -> str:
    """A field named as an option in a message: `` `round_to` `` (the CLI prints it as its flag, ``--round-to``)."""
    return f"`{name}`"


def validate(obj: Any, *, where: Callable[[str], str] | str = option) -> None:
    """Every field of the dataclass instance ``obj`` within its bounds; ``where`` names a field in messages (a
    function of the field name, or a prefix)."""
    for f in dataclasses.fields(obj):
        name = where(f.name) if callable(where) else f"{where}: {f.name}"
        check_value(getattr(obj, f.name), f.metadata, where=name)


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_mapping(
    cls: type[T],
    mapping: Mapping[str, Any] | None,
    *,
    where: str,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """``cls(**mapping)`` with its keys checked against the fields (or ``only``) and its values coerced."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise CarveError(f"{where}: expected a mapping of settings, got {type(mapping).__name__} {mapping!r}")
    valid = list(only) if only is not None else field_names(cls)
    unknown = sorted(set(mapping) - set(valid), key=str)
    if unknown:
        raise CarveError(f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(valid))}")
    hints = typing.get_type_hints(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    values = dict(defaults or {})
    for key, value in mapping.items():
        values[key] = coerce(value, hints[key], where=f"{where}: {key}")
        check_value(values[key], meta.get(key, {}), where=f"{where}: {key}")
    return cls(**values)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """``cls`` from the parsed arguments whose destinations are named like its fields (argparse typed them)."""
    names = set(field_names(cls))
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    obj = cls(**values)
    validate(obj)
    return obj


def options_for(fn: Callable[..., Any], values: Mapping[str, Any] | argparse.Namespace) -> dict[str, Any]:
    """The entries of ``values`` (a mapping or parsed arguments) that ``fn`` takes as keyword parameters."""
    values = vars(values) if isinstance(values, argparse.Namespace) else values
    params = inspect.signature(fn).parameters
    return {k: v for k, v in values.items() if k in params and params[k].kind != inspect.Parameter.VAR_KEYWORD}


def coerce(value: Any, hint: Any, *, where: str) -> Any:
    """``value`` as the type ``hint`` says, or a CarveError naming ``where``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return coerce(value, a, where=where)
            except CarveError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        (item,) = args or (Any,)
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce(v, item, where=where) for v in items]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise CarveError(f"{where} must be a mapping of options, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise CarveError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise CarveError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise CarveError(f"{where} must be a finite number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise CarveError(f"{where} must be a string, got {value!r}")
    return value
