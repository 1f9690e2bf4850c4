"""``carve plugins``: the criteria, allocators and passes carve knows, with what each needs."""

from __future__ import annotations

import argparse
import inspect
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list criteria, allocators and passes", description=__doc__)
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.set_defaults(func=run)


def _options(obj) -> dict:
    if isinstance(getattr(obj, "options", None), dict):
        return dict(obj.options)
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}
    skip = {"self", "analysis", "scores", "frozen", "ratio", "round_to", "keep_min"}
    return {k: v.default for k, v in sig.parameters.items() if k not in skip and v.default is not inspect._empty}


def _doc(obj) -> str:
    d = getattr(obj, "description", "") or (inspect.getdoc(obj) or "").split("\n")[0]
    return d


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from carve.pipeline.cli._common import console
    from carve.pipeline.passes import passes
    from carve.pipeline.pruning.allocator import allocators
    from carve.pipeline.pruning.criterion import criteria

    info = {
        "criteria": [
            {"name": n, "needs": sorted(c.needs) or ["nothing"], "description": _doc(c), "options": _options(c)}
            for n, c in criteria.items()
        ],
        "allocators": [{"name": n, "description": _doc(a), "options": _options(a)} for n, a in allocators.items()],
        "passes": [
            {"name": n, "exact": bool(p.exact), "description": _doc(p), "options": _options(p)}
            for n, p in passes.items()
        ],
    }
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    con = console()
    for section, cols in (
        ("criteria", ("name", "needs", "description", "options")),
        ("allocators", ("name", "description", "options")),
        ("passes", ("name", "exact", "description", "options")),
    ):
        t = Table(title=section, title_justify="left")
        for c in cols:
            t.add_column(c, overflow="fold")
        for row in info[section]:
            vals = []
            for c in cols:
                v = row[c]
                if isinstance(v, list):
                    v = ", ".join(v)
                elif isinstance(v, dict):
                    v = ", ".join(f"{k}={val}" for k, val in v.items())
                vals.append(str(v))
            t.add_row(*vals)
        con.print(t)
    return 0
