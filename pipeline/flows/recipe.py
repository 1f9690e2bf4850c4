"""Recipes: a whole carve pipeline in one YAML file, run by ``carve run recipe.yaml``.

    model: zoo:resnet56            # an ONNX path (relative to the recipe) or zoo:NAME (exported on the fly)
    output: out/r56_carved.onnx
    data:
      calib: digits                # or a path; used by passes that need data
      eval: digits:test            # accuracy and agreement of original and final
      samples: 512                 # calibration samples
      eval_samples: 1000
    passes:                        # in order; each a pass name with its options (`carve plugins` lists them)
      - prune: {criterion: l1, target_macs: 0.5, round_to: 8, fuse: lsq}
      - merge: {when: macs}
    bench:                         # optional: side-by-side measurement of original and final
      backend: ort
      threads: 1
      batch: [1, 8]
    thresholds:                    # optional: the run fails (exit 1) when one is not met
      min_top1_agreement: 0.9
      max_accuracy_drop: 0.05
      max_macs: 0.6
      max_slowdown: 5%

Paths are relative to the recipe file. Unknown keys are errors that name the key, so typos do not pass silently.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import from_mapping
from pipeline.data.datasets import Preprocess, load_data
from pipeline.errors import CarveError
from pipeline.graph import check_output_path, load, save
from pipeline.graph.cost import model_cost
from pipeline.measure import gate
from pipeline.measure.compare import compare
from pipeline.measure.config import MeasureConfig
from pipeline.measure.evaluate import evaluate
from pipeline.passes import Dump, NumericCheck, PassContext, PassManager, Timing, get, record_pass

TOP_KEYS = {"model", "output", "data", "passes", "bench", "thresholds", "seed", "report", "name"}
DATA_KEYS = {"calib", "eval", "samples", "eval_samples", "mean", "std"}
THRESHOLD_KEYS = {"min_top1_agreement", "max_accuracy_drop", "max_macs", "max_params", "max_slowdown", "min_speedup"}


@dataclass
class Recipe:
    path: Path
    model: str
    output: Path
    passes: list[tuple[str, dict[str, Any]]]
    data: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] | None = None
    thresholds: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    report: Path | None = None
    name: str = ""

    def resolve(self, p: str | Path) -> Path:
        p = Path(p)
        return p if p.is_absolute() else (self.path.parent / p)


def _percent(v: Any) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        return float(v.strip()[:-1]) / 100
    return float(v)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise CarveError(f"{path}: no such recipe file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CarveError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise CarveError(f"{path}: a recipe is a mapping with at least `model` and `passes`")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise CarveError(f"{path}: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(TOP_KEYS))}")
    for key in ("model", "passes"):
        if key not in doc:
            raise CarveError(f"{path}: missing `{key}`")
    passes = []
    for k, item in enumerate(doc["passes"] or []):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise CarveError(f"{path}: passes[{k}] must be a pass name or {{name: {{options}}}}")
        ((name, opts),) = item.items()
        passes.append((str(name), dict(opts or {})))
    data = dict(doc.get("data") or {})
    unknown = set(data) - DATA_KEYS
    if unknown:
        raise CarveError(f"{path}: unknown data key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(DATA_KEYS))}")
    thresholds = {k: _percent(v) for k, v in (doc.get("thresholds") or {}).items()}
    unknown = set(thresholds) - THRESHOLD_KEYS
    if unknown:
        raise CarveError(
            f"{path}: unknown threshold {sorted(unknown)[0]!r}; valid: {', '.join(sorted(THRESHOLD_KEYS))}"
        )
    stem = path.stem
    output = doc.get("output") or f"{stem}.onnx"
    r = Recipe(
        path=path,
        model=str(doc["model"]),
        output=Path(output),
        passes=passes,
        data=data,
        bench=doc.get("bench"),
        thresholds=thresholds,
        seed=int(doc.get("seed", 0)),
        report=Path(doc["report"]) if doc.get("report") else None,
        name=str(doc.get("name") or stem),
    )
    r.output = r.resolve(r.output)
    if r.report is not None:
        r.report = r.resolve(r.report)
    return r


def resolve_model(recipe: Recipe, workdir: Path):
    """Load the recipe's model: an ONNX path, or ``zoo:NAME`` exported into ``workdir``."""
    spec = recipe.model
    if spec.startswith("zoo:"):
        import models

        out = workdir / f"{spec[4:]}.onnx"
        models.export(spec[4:], out)
        return load(out)
    return load(recipe.resolve(spec))


def run_recipe(recipe: Recipe, *, keep_intermediate: Path | None = None, progress=None, command: str | None = None):
    """Run every pass, evaluate, (optionally) benchmark, check thresholds. Returns (final model, report dict)."""

    check_output_path(recipe.output)
    with tempfile.TemporaryDirectory(prefix="carve-recipe-") as tmp:
        original = resolve_model(recipe, Path(tmp))
    pre = Preprocess.for_model(original)
    if "mean" in recipe.data:
        pre.mean = tuple(recipe.data["mean"])
    if "std" in recipe.data:
        pre.std = tuple(recipe.data["std"])

    def data_source(key: str):
        v = recipe.data.get(key)
        if v is None:
            return None
        return v if str(v).startswith("digits") else recipe.resolve(v)

    calib = None
    if data_source("calib") is not None:
        calib = load_data(
            data_source("calib"),
            model=original,
            preprocess=pre,
            samples=int(recipe.data.get("samples", 512)),
            seed=recipe.seed,
        )
    pass_objs = [get(name, **opts) for name, opts in recipe.passes]
    instruments = [NumericCheck(), Timing()]
    if keep_intermediate is not None:
        instruments.append(Dump(keep_intermediate))
    ctx = PassContext(calib=calib, seed=recipe.seed, command=command, progress=progress)
    final, results = PassManager(pass_objs, instruments).run(original, ctx)
    for p, r in zip(pass_objs, results):
        if p.name != "prune":  # prune records itself
            record_pass(final, p, r, command)
    c0, c1 = model_cost(original), model_cost(final)
    report: dict[str, Any] = {
        "schema_version": 1,
        "kind": "carve.run",
        "command": command,
        "recipe": {"name": recipe.name, "path": str(recipe.path), "model": recipe.model, "output": str(recipe.output)},
        "passes": [
            {
                "pass": p.name,
                "exact": p.exact,
                "changed": r.changed,
                "seconds": round(r.seconds, 3),
                "error": r.error,
                "summary": {k: v for k, v in r.summary.items() if k != "details"},
                "details": r.details[:50],
            }
            for p, r in zip(pass_objs, results)
        ],
        "cost": {
            "params_before": c0.params,
            "params_after": c1.params,
            "macs_before": c0.macs,
            "macs_after": c1.macs,
            "params_ratio": c1.params / c0.params,
            "macs_ratio": c1.macs / c0.macs,
        },
    }
    if data_source("eval") is not None:
        ev = load_data(
            data_source("eval"),
            model=original,
            preprocess=pre,
            samples=recipe.data.get("eval_samples"),
            seed=recipe.seed + 1,
        )
        report["accuracy"] = {"original": evaluate(original, ev), "final": evaluate(final, ev, reference=original)}
    return original, final, report


BENCH_KEYS = {
    "backend",
    "device",
    "threads",
    "batch",
    "precision",
    "rounds",
    "min_round_ms",
    "warmup_ms",
    "isolate",
    "cuda_graphs",
    "channels_last",
    "compile",
    "provider_options",
    "spinning",
    "memory",
}


def bench_recipe(recipe: Recipe, original, final_path: Path, progress=None) -> dict:
    """Measure the original against the final model as the recipe's ``bench`` section says; the report's sections."""

    cfg = from_mapping(
        MeasureConfig,
        recipe.bench,
        where=f"{recipe.path}: bench",
        only=BENCH_KEYS,
        defaults={"seed": recipe.seed, "agreement": False},
    )
    with tempfile.TemporaryDirectory(prefix="carve-bench-") as tmp:
        orig_path = Path(tmp) / "original.onnx"
        save(original, orig_path)
        bench = compare(orig_path, final_path, cfg, progress=progress)
    bench["models"]["a"]["name"] = "original"
    return {k: bench[k] for k in ("models", "results", "memory", "environment", "settings") if k in bench}


def check_thresholds(recipe: Recipe, report: dict) -> list[str]:
    """Violated thresholds, as sentences (empty when all hold)."""
    t, bad = recipe.thresholds, []
    if ("max_slowdown" in t or "min_speedup" in t) and not report.get("results"):
        bad.append("max_slowdown / min_speedup need a `bench` section")
    elif report.get("results"):
        verdict = gate.evaluate(
            report,
            max_slowdown=t.get("max_slowdown", 1.0 - 1e-9),  # without a limit: fail only on a certain slow-down
            min_speedup=t.get("min_speedup"),
        )
        bad += verdict.failures
    acc = report.get("accuracy", {})
    fin, orig = acc.get("final", {}), acc.get("original", {})
    if "min_top1_agreement" in t:
        got = fin.get("reference", {}).get("top1_agreement")
        if got is None:
            bad.append("min_top1_agreement needs `data: eval`")
        elif got < t["min_top1_agreement"]:
            bad.append(f"top-1 agreement {got:.3f} < {t['min_top1_agreement']:.3f}")
    if "max_accuracy_drop" in t:
        if "top1" not in fin or "top1" not in orig:
            bad.append("max_accuracy_drop needs labelled `data: eval`")
        elif orig["top1"] - fin["top1"] > t["max_accuracy_drop"]:
            bad.append(f"top-1 dropped {orig['top1'] - fin['top1']:.3f} > {t['max_accuracy_drop']:.3f}")
    for key, name in (("max_macs", "macs_ratio"), ("max_params", "params_ratio")):
        if key in t and report["cost"][name] > t[key]:
            bad.append(f"{name.split('_')[0]} ratio {report['cost'][name]:.3f} > {t[key]:.3f}")
    return bad
