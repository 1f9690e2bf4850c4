"""The layers drawn in docs/architecture.md, enforced: every import in pipeline/, plugins/ and models/ (module level
and inside functions) is parsed, and each layer may import only the layers below it."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from conftest import REPO

# layer -> the layers it may import (besides itself and the shared base)
ALLOWED = {
    "base": set(),
    "graph": set(),
    "runtime": {"graph"},
    "data": {"graph", "runtime"},
    "pruning": {"graph", "runtime", "data"},
    "training": {"graph", "runtime", "data"},
    "passes": {"graph", "runtime", "data"},
    "measure": {"graph", "runtime", "data"},
    "plugins": {"graph", "runtime", "data", "pruning", "training", "passes", "measure"},
    "models": {"graph", "data"},
    "flows": {"graph", "runtime", "data", "pruning", "training", "passes", "measure", "models"},
    "cli": {"graph", "runtime", "data", "pruning", "training", "passes", "measure", "models", "flows"},
    "api": {"graph", "pruning", "data"},  # carve/__init__.py: the lazy facade of the Python API
}
BASE = {f"carve.pipeline.{m}" for m in ("errors", "version", "registry", "config", "progress", "files")}
# installed names -> the folders they come from (pyproject's package-dir)
FOLDERS = {"carve.pipeline": "pipeline", "carve.plugins": "plugins", "carve.models": "models", "carve": "carve"}


def layer_of(module: str) -> str | None:
    if module == "carve":
        return "api"  # carve/__init__.py: the lazy facade of the Python API
    if module == "carve.__main__":
        return "cli"  # python -m carve
    if not module.startswith("carve."):
        return None
    parts = module.split(".")[1:]
    if parts[0] in ("plugins", "models"):
        return parts[0]
    if parts[0] != "pipeline":
        return None
    if module in BASE:
        return "base"
    if len(parts) == 1:
        return "api"
    return parts[1] if parts[1] in ALLOWED else None


def module_name(path: Path) -> str:
    """The installed name of a source file: pipeline/graph/io.py -> carve.pipeline.graph.io."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    top = next((name for name, folder in FOLDERS.items() if folder == parts[0]), parts[0])  # tools/ is not installed
    return ".".join([top, *parts[1:]])


def source_path(module: str) -> Path:
    """Where an installed name's source lies (without suffix): carve.pipeline.graph -> REPO/pipeline/graph."""
    parts = module.split(".")
    for n in (2, 1):
        top = ".".join(parts[:n])
        if top in FOLDERS:
            return REPO.joinpath(FOLDERS[top], *parts[n:])
    return REPO.joinpath(*parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) of every import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, node.lineno, id(node) in top))
            for a in node.names:  # `from carve.pipeline.graph import surgery` imports a module too
                found.append((f"{mod}.{a.name}", node.lineno, id(node) in top))
    return found


def sources() -> list[Path]:
    return [p for d in ("carve", "pipeline", "plugins", "models") for p in sorted((REPO / d).rglob("*.py"))]


def known(module: str) -> bool:
    p = source_path(module)
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def test_layers_import_only_downwards():
    bad = []
    for path in sources():
        src = layer_of(module_name(path))
        assert src is not None, f"{path} lies in no layer of docs/architecture.md"
        for mod, line, _ in imports(path):
            dst = layer_of(mod)
            if dst is None or dst in ("base", src) or not known(mod):
                continue
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(REPO)}:{line}: {src} imports {mod} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_base_modules_import_only_each_other():
    for mod in BASE:
        path = source_path(mod).with_suffix(".py")
        for imported, line, _ in imports(path):
            assert layer_of(imported) in (None, "base") or not known(imported), f"{path}:{line} imports {imported}"


def test_only_the_tensorrt_backend_imports_tensorrt():
    users = [
        f"{p.relative_to(REPO)}:{line}"
        for p in sources() + sorted((REPO / "tools").rglob("*.py"))
        for mod, line, _ in imports(p)
        if mod == "tensorrt" or mod.startswith("tensorrt.")
    ]
    assert users and all(u.startswith("pipeline/measure/backends/trt.py:") for u in users), users


def test_flows_and_cli_reach_plugins_through_registries_only():
    for path in sources():
        if layer_of(module_name(path)) in ("flows", "cli", "api"):
            direct = [m for m, _, _ in imports(path) if m.startswith("carve.plugins")]
            assert not direct, f"{path} imports {direct[0]}"


def test_no_plugin_imports_another_plugin():
    """A plugin reaches what it shares with others through the pipeline layer (carve.pipeline.pruning.scoring,
    carve.pipeline.graph.fold, carve.pipeline.training.options), never through another plugin's module; a plugin
    package's ``__init__`` imports only its own modules (to register them)."""
    bad = []
    for path in sorted((REPO / "plugins").rglob("*.py")):
        here = module_name(path)
        own = here if path.name == "__init__.py" else None
        for mod, line, _ in imports(path):
            if not mod.startswith("carve.plugins") or not known(mod) or mod == here:
                continue
            if own is not None and (mod == own or mod.startswith(own + ".")):
                continue
            if (source_path(mod) / "__init__.py").is_file() and here.startswith(mod + "."):
                continue  # `from carve.plugins.criteria import x` names the package on the way to x
            bad.append(f"{path.relative_to(REPO)}:{line}: imports {mod}")
    assert not bad, "plugins importing plugins:\n" + "\n".join(bad)


def _written(target: ast.expr) -> ast.expr | None:
    """The object whose state an assignment target changes: ``a.b[c] = v`` and ``a.b = v`` change ``a``."""
    while isinstance(target, ast.Subscript | ast.Attribute):
        inner = target.value
        if isinstance(target, ast.Attribute) or isinstance(inner, ast.Attribute):
            return inner if isinstance(target, ast.Attribute) else inner.value
        target = inner
    return None


def test_no_plugin_writes_into_the_channel_analysis():
    """The analysis is shared by every plugin of a run: a plugin memoises in its own module (e.g. a WeakKeyDictionary
    keyed by the analysis), never by storing attributes or entries into the analysis."""
    from carve.pipeline.graph.channels import ChannelAnalysis

    assert (
        not hasattr(ChannelAnalysis, "cache")
        and "self.cache" not in (REPO / "pipeline/graph/channels/analysis.py").read_text()
    )
    bad = []
    for path in sorted((REPO / "plugins").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            targets += [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for t in targets:
                obj = _written(t)
                name = obj.attr if isinstance(obj, ast.Attribute) else getattr(obj, "id", None)
                if name in ("analysis", "an"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: writes into {ast.unparse(t)}")
    assert not bad, "plugins writing into the channel analysis:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    """Packages (carve.pipeline.graph.channels, carve.pipeline.measure.backends, carve.plugins.criteria, ...) form no
    cycle through module-level imports."""

    def package(module: str) -> str:
        path = source_path(module)
        return module if (path / "__init__.py").is_file() else module.rsplit(".", 1)[0]

    edges: dict[str, set[str]] = defaultdict(set)
    for path in sources():
        here = package(module_name(path)) if path.name != "__init__.py" else module_name(path)
        for mod, _, top in imports(path):
            if top and known(mod) and layer_of(mod) is not None:
                there = package(mod)
                if there != here and not here.startswith(there + ".") and not there.startswith(here + "."):
                    edges[here].add(there)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


# -- what crosses layers: options by name, history by its owner -------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
COMMAND = re.compile(r"`[a-z][\w.-]* [^`]*`")  # a whole command line in backticks: `carve inspect --groups`
# flags of other programs that carve runs, not carve's options
EXTERNAL_FLAGS = {("pipeline/measure/environment.py", "--query-gpu"), ("pipeline/measure/environment.py", "--format")}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                out.add(id(first.value))
    return out


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal but docstrings; an f-string as one text with ``{}`` for its fields."""
    tree = ast.parse(path.read_text())
    skip = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            out.append((node.lineno, node.value))
    return out


def test_no_layer_below_the_cli_names_a_command_line_flag():
    """Messages below the CLI name an option as recipes and the Python API spell it (`` `round_to` ``); the CLI
    writes it as its flag (carve.pipeline.cli.as_flags). A whole command in backticks (`` `carve inspect --groups` ``)
    is a command to run, not an option of this one."""
    bad = []
    for path in sources():
        if layer_of(module_name(path)) in ("cli", None):
            continue
        rel = str(path.relative_to(REPO))
        for line, text in string_literals(path):
            for flag in FLAG.findall(COMMAND.sub("", text)):
                if (rel, flag) not in EXTERNAL_FLAGS:
                    bad.append(f"{rel}:{line}: {flag} in {text.strip()[:80]!r}")
    assert not bad, "command-line flags below the CLI:\n" + "\n".join(bad)


def test_the_cli_writes_option_names_as_its_flags():
    from carve.pipeline.cli import as_flags, build_parser, flags_for

    prune = flags_for(build_parser().parse_args(["prune", "m.onnx", "-o", "o.onnx"]).commands["prune"])
    text = "`round_to` 16 and `keep_min`; `allocator`; `verify=false`; `repairs`; `nosuch`; `carve inspect`"
    assert as_flags(text, prune) == "--round-to 16 and --keep-min; --allocate; --no-verify; --repair; `nosuch`; " + (
        "`carve inspect`"
    )


def history_keys() -> set[str]:
    """The metadata keys of the model's history: carve.history, carve.command and carve.<step> for every step that
    records itself (the prune operation, fine-tuning, every registered pass)."""
    from carve.pipeline.passes import passes

    return {"carve.history", "carve.command", *(f"carve.{s}" for s in ["prune", "finetune", *passes.names()])}


def test_only_the_history_module_reads_or_writes_history_metadata():
    """A step's summary is written once, by graph/history.py's ``record`` from the typed report of the layer that
    made the model; nothing reads it back to add to it (``history()`` is the one reader, for reports and tests)."""
    keys = history_keys()
    owner = "pipeline/graph/history.py"
    bad = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path in sources()
        if str(path.relative_to(REPO)) != owner
        for line, text in string_literals(path)
        if text in keys
    ]
    assert not bad, "history metadata handled outside graph/history.py:\n" + "\n".join(bad)


# -- complexity -------------------------------------------------------------------------------------------------------

COMPLEXITY_LIMIT = 30  # tools/complexity.py's LIMIT; the README's development section shows where the code stands


def test_no_function_exceeds_the_complexity_limit():
    """McCabe complexity as radon counts it (the dev extra installs radon), over pipeline/, plugins/ and models/."""
    import pytest

    pytest.importorskip("radon", reason="radon (the dev extra) measures complexity: pip install -e '.[dev]'")
    from radon.complexity import cc_visit

    over = []
    for folder in ("pipeline", "plugins", "models"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for fn in cc_visit(path.read_text()):
                for f in [fn, *getattr(fn, "closures", [])]:
                    if type(f).__name__ == "Function" and f.complexity > COMPLEXITY_LIMIT:
                        over.append(f"{path.relative_to(REPO)}:{f.lineno} {f.name}: {f.complexity}")
    assert not over, f"functions above cyclomatic complexity {COMPLEXITY_LIMIT} (split them):\n" + "\n".join(over)


# -- stale prose ------------------------------------------------------------------------------------------------------

NUMBER = r"~?\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?"
# what a benchmark figure looks like in prose: an accuracy, a ratio that says faster/slower, a time something took,
# or a sentence that says it measured something and gives a figure with a unit
FIGURE = re.compile(
    rf"{NUMBER}\s?%\s+top-[15]|top-[15]\s+(?:of\s+)?{NUMBER}\s?%"
    rf"|{NUMBER}\s?[x×]\s+(?:faster|slower|cheaper|smaller|quicker)"
    rf"|(?:took|turned|ran|runs in|ran in)\s+(?:a\s+)?{NUMBER}\s?(?:ms|s|min)\b"
    rf"|\bmeasured(?: on| at| here| once|:)[^.;]*?\b{NUMBER}\s?(?:%|x\b|ms\b|s\b)",
    re.I,
)


def test_docstrings_quote_no_benchmark_figures():
    """Measured figures go stale in code: they belong in docs/ next to the committed JSON that produced them. Flags
    the obvious quotes (an accuracy, an N-times-faster, a time something took, "measured ... 12 ms") in the
    docstrings of pipeline/, plugins/ and models/; design constants (a 5% tolerance) are not measurements."""
    bad = []
    for d in ("pipeline", "plugins", "models"):
        for path in sorted((REPO / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                doc = " ".join((ast.get_docstring(node, clean=False) or "").split())
                bad += [f"{path.relative_to(REPO)}: ...{m.group(0)}..." for m in FIGURE.finditer(doc)]
    assert not bad, "benchmark figures quoted in docstrings (move them to docs/):\n" + "\n".join(bad)


def test_the_figure_rule_catches_what_it_should():
    quotes = [
        "on ResNet-56 the stream turned a 100-370 s least-squares repair into 6-7 s",
        "(measured on ResNet-20: 50% unstructured sparsity kept 15.6% top-1)",
        "which is ~30x cheaper than inferring",
        "multi-threaded BLAS was 10-100x slower on them",
    ]
    design = [
        "when the measured latency misses the target by more than 5%",
        "at most 5%, and at least 3%",
        "``0.5`` or ``50%``",
        "a 3x3 kernel",
        "4ms or 800us",
        "top-1 agreement",
    ]
    assert all(FIGURE.search(q) for q in quotes)
    assert not any(FIGURE.search(d) for d in design)
