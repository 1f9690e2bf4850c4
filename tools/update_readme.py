"""Rewrite the README's benchmark tables from the committed JSON under ``benchmarks/``.

Each table sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and is exactly
``tools/bench_NAME.py``'s (or ``tools/NAME.py``'s) ``markdown(json.load(benchmarks/NAME.json))``;
``<!-- report:NAME -->`` holds ``carve report``'s rendering of ``benchmarks/NAME.json``. ``<!-- bench:gpu -->`` holds
``tools/gpu_check.py``'s rendering of every committed ``benchmarks/gpu_<device>.json``, or the statement that GPU
figures are not measured yet. So the README can only show numbers that a committed benchmark run produced
(``tests/test_readme.py`` checks it).

    python tools/update_readme.py            # rewrite README.md in place
    python tools/update_readme.py --check    # exit 1 when a table is stale
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- (bench|report):(\w+) -->\n)(.*?)(<!-- /\2:\3 -->)", re.S)


def _script(name: str):
    for path in (REPO, REPO / "tools"):  # the scripts import the project and tools/benchio.py
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    script = REPO / "tools" / f"{name}.py"
    if not script.exists() and name.startswith("bench_"):  # a suite that is not a timing benchmark (tools/fuzz.py)
        script = REPO / "tools" / f"{name.removeprefix('bench_')}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(name: str) -> str:
    if name == "gpu":  # one document per device (benchmarks/gpu_<device>.json), written by tools/gpu_check.py
        module = _script("gpu_check")
        return module.readme(module.committed()).rstrip("\n") + "\n"
    module = _script(f"bench_{name}")
    doc = json.loads((REPO / "benchmarks" / f"{name}.json").read_text())
    return module.markdown(doc).rstrip("\n") + "\n"


def report(name: str) -> str:
    """``carve report``'s Markdown of benchmarks/NAME.json, headings demoted to sit under a README section."""
    sys.path.insert(0, str(REPO))
    from carve.pipeline.measure.report import load_report, to_markdown

    md = to_markdown(load_report(REPO / "benchmarks" / f"{name}.json")).rstrip("\n")
    return "\n".join("###" + ln if ln.startswith("#") else ln for ln in md.splitlines()) + "\n"


def render(text: str) -> str:
    def section(m: re.Match) -> str:
        body = table(m.group(3)) if m.group(2) == "bench" else report(m.group(3))
        return m.group(1) + body + m.group(5)

    return MARKER.sub(section, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = REPO / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md benchmark tables are stale: run python tools/update_readme.py", file=sys.stderr)
            return 1
        return 0
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
