"""YAML read as data, with bounds on what a small file can expand to (issue 21).

``yaml.safe_load`` builds only plain data (no tags that run code), but an alias tree (``&a [*b, *b, ...]``) of a few
hundred bytes stands for billions of leaves: loading it is quick (aliases are shared), but everything that walks it
afterwards (validation, hashing, JSON) never returns. :func:`load_yaml` composes the document first and refuses,
in one line naming the file, a document that is too large, nested too deeply, recursive, or expands (aliases
followed) to more than :data:`MAX_NODES` nodes; only then is it constructed.
"""

from __future__ import annotations

from typing import Any

import yaml

from carve.pipeline.errors import CarveError

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
