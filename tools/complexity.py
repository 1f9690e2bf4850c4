"""Cyclomatic complexity of carve's own code (pipeline/, plugins/, models/), measured with radon: the most complex
functions before the issue-20 clean-up (commit 810e935) and now, written to ``benchmarks/complexity.json``.

A function's complexity is McCabe's number as radon counts it (1 + branches: if/elif, loops, boolean operators,
except clauses, comprehension conditions). ``tests/test_architecture.py`` keeps every function at or below
:data:`LIMIT`; this script records where the code stands against it.

    python tools/complexity.py                 # write benchmarks/complexity.json and print the README table
    python tools/complexity.py --before REV    # measure "before" at another commit (default 810e935)
"""

from __future__ import annotations

import argparse
import subprocess
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import benchio

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("pipeline", "plugins", "models")
LIMIT = 30  # the most a function may reach (tests/test_architecture.py)
BEFORE = "810e935"  # the last commit before the issue-20 clean-up of complexity
TOP = 15


def functions(root: Path) -> list[dict]:
    """Every function and method under ``root``'s FOLDERS with its complexity, most complex first."""
    from radon.complexity import cc_visit

    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            for fn in cc_visit(path.read_text()):  # functions and methods (classes' methods are listed too)
                if type(fn).__name__ != "Function":
                    continue
                name = f"{fn.classname}.{fn.name}" if fn.classname else fn.name
                where = f"{path.relative_to(root)}:{name}"
                out.append({"function": where, "line": fn.lineno, "complexity": fn.complexity})
                out += [
                    {"function": f"{where}.{c.name}", "line": c.lineno, "complexity": c.complexity} for c in fn.closures
                ]
    return sorted(out, key=lambda f: (-f["complexity"], f["function"]))


def summary(fns: list[dict], top: int = TOP) -> dict:
    values = [f["complexity"] for f in fns]
    return {
        "functions": len(values),
        "max": max(values, default=0),
        "over_limit": sum(v > LIMIT for v in values),
        "mean": round(sum(values) / max(len(values), 1), 2),
        "top": fns[:top],
    }


def at_commit(rev: str) -> dict:
    """:func:`summary` of the tree at ``rev`` (its FOLDERS extracted into a temporary folder with ``git archive``)."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", rev, *FOLDERS], check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(tar)) as t:
            t.extractall(tmp, filter="data")
        return summary(functions(Path(tmp)))


def head() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def markdown(doc: dict) -> str:
    b, a = doc["before"], doc["after"]
    lines = [
        f"Cyclomatic complexity (radon) of pipeline/, plugins/ and models/: {b['functions']} functions at "
        f"{doc['before_commit']}, {a['functions']} at {doc['after_commit']}; the limit is {doc['limit']} "
        f"(tests/test_architecture.py).",
        "",
    ]
    lines += benchio.table(
        ["", f"before ({doc['before_commit']})", f"after ({doc['after_commit']})"],
        [
            ["highest", b["max"], a["max"]],
            [f"above {doc['limit']}", b["over_limit"], a["over_limit"]],
            ["mean", b["mean"], a["mean"]],
        ],
    )
    lines += ["", f"The {len(b['top'])} most complex functions, before and after:", ""]
    rows = []
    for k in range(max(len(b["top"]), len(a["top"]))):
        x = b["top"][k] if k < len(b["top"]) else {"function": "", "complexity": ""}
        y = a["top"][k] if k < len(a["top"]) else {"function": "", "complexity": ""}
        rows.append([k + 1, f"`{x['function']}`", x["complexity"], f"`{y['function']}`", y["complexity"]])
    lines += benchio.table(["#", "before", "cc", "after", "cc"], rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=BEFORE, help="the commit to measure as 'before'")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "complexity.json"))
    ap.add_argument("--quiet", action="store_true", help="do not print the README table")
    args = ap.parse_args()
    started = time.time()
    doc = benchio.document(
        "complexity",
        started,
        tool="radon cc (McCabe)",
        folders=list(FOLDERS),
        limit=LIMIT,
        before_commit=args.before,
        after_commit=head(),
        before=at_commit(args.before),
        after=summary(functions(REPO)),
    )
    benchio.write(doc, args.output, markdown, show=not args.quiet)


if __name__ == "__main__":
    main()
