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

import yaml

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


# -- YAML read as data, with bounds on what a small file can expand to (issue 21) -------------------------------------
#
# ``yaml.safe_load`` builds only plain data (no tags that run code), but an alias tree (``&a [*b, *b, ...]``) of a few
# hundred bytes stands for billions of leaves: loading it is quick (aliases are shared), but everything that walks it
# afterwards (validation, hashing, JSON) never returns. :func:`load_yaml` composes the document first and refuses, in
# one line naming the file, a document that is too large, nested too deeply, recursive, or expands (aliases followed)
# to more than :data:`MAX_NODES` nodes; only then is it constructed.


MAX_BYTES = 1_000_000  # a recipe or sweep file is a few KB
MAX_NODES = 100_000  # nodes once every alias is expanded
MAX_DEPTH = 64  # nesting of lists and mappings


def _expanded(root: yaml.Node, where: str) -> int:
    """Nodes in the document with aliases expanded (each shared node counted once per use), without expanding it:
    sizes are memoised per node. Refuses recursion and excessive depth."""
    size: dict[int, int] = {}
    # iterative post-order walk: (node, depth, children done)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = min(MAX_NODES + 1, 1 + sum(size[id(k)] for k in kids))
            continue
        if key in size:
            continue
        if key in on_path:
            raise CarveError(f"{where}: a YAML alias refers to itself (a recursive structure); carve reads plain data")
        if depth > MAX_DEPTH:
            raise CarveError(f"{where}: YAML nested deeper than {MAX_DEPTH} levels; carve reads plain, shallow data")
        on_path.add(key)
        stack.append((node, depth, True))
        for k in _children(node):
            if id(k) not in size:
                stack.append((k, depth + 1, False))
    return size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def load_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text`` as plain data, or a one-line :class:`CarveError` naming ``where``."""
    if len(text) > MAX_BYTES:
        raise CarveError(f"{where}: {len(text):,} characters of YAML; carve reads at most {MAX_BYTES:,}")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise CarveError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise CarveError(f"{where}: YAML nested too deeply; carve reads plain, shallow data") from None
    if root is None:
        return None
    n = _expanded(root, where)
    if n > MAX_NODES:
        raise CarveError(
            f"{where}: YAML expands to more than {MAX_NODES:,} values once its aliases are followed (an alias bomb?)",
            hint="write the values out; carve refuses documents that expand beyond that",
        )
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CarveError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
