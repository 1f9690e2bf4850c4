"""Recipes: a whole carve pipeline in one YAML file, run by ``carve run recipe.yaml``.

    model: zoo:resnet56            # an ONNX path (relative to the recipe) or zoo:NAME (exported on the fly)
    output: out/r56_carved.onnx
    data:
      calib: digits                # or a path; used by passes that need data
      eval: digits:test            # accuracy and agreement of original and final
      train: digits:train          # training data of the finetune / gradual passes (labels optional)
      samples: 512                 # calibration samples
      eval_samples: 1000           # (train_samples: all by default)
    passes:                        # in order; each a pass name with its options (`carve plugins` lists them)
      - prune: {criterion: l1, target_macs: 0.5, round_to: 8, fuse: lsq}
      - finetune: {epochs: 3}      # distillation from the recipe's model
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

Paths are relative to the recipe file (whatever the current folder); ``shared:data/cifar10/test.npz`` is a file under
``$CARVE_SHARED`` (or ``../shared``). ``carve run --out-dir DIR`` writes the model and the report into DIR only.
Unknown keys, values of the wrong type and values out of range are errors that name the key, so typos do not pass
silently.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from carve.pipeline.config import bounds, from_mapping, load_yaml
from carve.pipeline.data.datasets import Preprocess, load_data
from carve.pipeline.errors import CarveError
from carve.pipeline.graph import check_output_path, load, save
from carve.pipeline.graph.cost import model_cost
from carve.pipeline.measure import gate
from carve.pipeline.measure.compare import compare
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.measure.evaluate import evaluate
from carve.pipeline.passes import Dump, NumericCheck, PassContext, PassManager, Timing, build, record_pass
from carve.pipeline.runtime.ort import check_runs


@dataclass
class RecipeFile:
    """The top-level keys of a recipe file, as written (validated by :func:`carve.pipeline.config.from_mapping`)."""

    model: str | None = None
    passes: list[Any] | None = None
    output: str | None = None
    data: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    seed: int = 0
    report: str | None = None
    name: str | None = None


@dataclass
class DataSection:
    """``data:``: where calibration and evaluation data come from (paths relative to the recipe, ``digits[:split]``
    or ``shared:<path>`` under ``$CARVE_SHARED``)."""

    calib: str | None = None
    eval: str | None = None
    train: str | None = None  # training data of the finetune / gradual passes
    samples: int = field(default=512, metadata=bounds(ge=1))
    eval_samples: int | None = field(default=None, metadata=bounds(ge=1))
    train_samples: int | None = field(default=None, metadata=bounds(ge=1))
    mean: list[float] | None = None
    std: list[float] | None = field(default=None, metadata=bounds(gt=0))


@dataclass
class Thresholds:
    """``thresholds:``: the run fails (exit 1) when one is not met. Fractions may be written ``5%``."""

    min_top1_agreement: float | None = field(default=None, metadata=bounds(ge=0, le=1))
    max_accuracy_drop: float | None = field(default=None, metadata=bounds(ge=0, le=1))
    max_macs: float | None = field(default=None, metadata=bounds(ge=0))
    max_params: float | None = field(default=None, metadata=bounds(ge=0))
    max_slowdown: float | None = field(default=None, metadata=bounds(ge=0, lt=1))
    min_speedup: float | None = field(default=None, metadata=bounds(gt=0))


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

    def model_path(self) -> Path | None:
        """The model file the recipe reads (None for ``zoo:NAME``)."""
        return None if self.model.startswith("zoo:") else self.resolve(self.model)

    def data_source(self, key: str) -> str | Path | None:
        """``data.calib`` / ``data.eval`` / ``data.train`` as :func:`carve.pipeline.data.datasets.load_data` takes it: a
        path resolved against the recipe's folder, or ``digits[:split]`` / ``shared:<path>`` as written."""
        v = self.data.get(key)
        if v is None:
            return None
        v = str(v)
        return v if v.startswith(("digits", "shared:")) else self.resolve(v)

    def inputs(self) -> list[Path]:
        """Every file the recipe reads (outputs must not be any of them)."""
        files = [self.path]
        if self.model_path() is not None:
            files.append(self.model_path())
        for key in ("calib", "eval", "train"):
            src = self.data_source(key)
            if isinstance(src, str) and src.startswith("shared:"):  # a file under $CARVE_SHARED is an input too
                from carve.pipeline.data.shared import shared_file

                src = shared_file(*[p for p in src[len("shared:") :].split("/") if p])
            if isinstance(src, Path):
                files.append(src)
        return files


def _percent(v: Any) -> Any:
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            return float(v.strip()[:-1]) / 100
        except ValueError:
            return v  # refused by the type check with the key's name
    return v


def read_mapping(path: Path, kind: str, keys: str) -> dict[str, Any]:
    """A YAML file holding one mapping (a recipe, a sweep), or a one-line error naming the file."""
    if not path.is_file():
        raise CarveError(f"{path}: no such {kind} file")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise CarveError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    doc = load_yaml(text, str(path))  # bounded: sizes, depth and alias expansion (issue 21)
    if not isinstance(doc, dict):
        raise CarveError(f"{path}: a {kind} is a mapping with {keys}")
    return doc


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    doc = read_mapping(path, "recipe", "at least `model` and `passes`")
    top = from_mapping(RecipeFile, doc, where=str(path))
    for key in ("model", "passes"):
        if getattr(top, key) is None:
            raise CarveError(f"{path}: missing `{key}`")
    if not isinstance(doc["passes"], list):
        raise CarveError(f"{path}: passes must be a list of pass names or {{name: {{options}}}}; got {doc['passes']!r}")
    passes = []
    for k, item in enumerate(doc["passes"]):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise CarveError(f"{path}: passes[{k}] must be a pass name or {{name: {{options}}}}; got {item!r}")
        ((name, opts),) = item.items()
        if opts is not None and not isinstance(opts, dict):
            raise CarveError(f"{path}: passes[{k}] ({name}): options must be a mapping; got {opts!r}")
        passes.append((str(name), dict(opts or {})))
    data = from_mapping(DataSection, top.data, where=f"{path}: data")
    raw_thresholds = top.thresholds or {}
    limits = from_mapping(Thresholds, {k: _percent(v) for k, v in raw_thresholds.items()}, where=f"{path}: thresholds")
    stem = path.stem
    r = Recipe(
        path=path,
        model=str(top.model),
        output=Path(top.output or f"{stem}.onnx"),
        passes=passes,
        data={k: v for k, v in asdict(data).items() if k in (top.data or {})},
        bench=top.bench,
        thresholds={k: v for k, v in asdict(limits).items() if v is not None},
        seed=top.seed,
        report=Path(top.report) if top.report else None,
        name=str(top.name or stem),
    )
    r.output = r.resolve(r.output)
    if r.report is not None:
        r.report = r.resolve(r.report)
    if r.bench is not None:
        bench_config(r)  # refused now, before any work, not after the passes ran
    return r


def check_pass(name: str, opts: dict[str, Any], *, has_calib: bool) -> None:
    """Everything about one pass that can be checked before any work (issue 21): its options, and for ``prune`` the
    criterion and its options, the allocator for the target, the repairs. Raises the pass's CarveError."""
    built = build(name, **opts)
    if name == "prune":
        from carve.pipeline.pruning.criterion import criteria

        o = built.opts
        o.check(object() if has_calib else None)
        criteria.get(o.criterion)(**o.criterion_options)
        for step in o.repair_steps():
            step.build()


def check_recipe(recipe: Recipe) -> None:
    """Validate every pass of a recipe before anything is created, each error naming the recipe file."""
    for k, (name, opts) in enumerate(recipe.passes):
        try:
            check_pass(name, opts, has_calib=recipe.data.get("calib") is not None)
        except CarveError as exc:
            raise CarveError(f"{recipe.path}: passes[{k}] ({name}): {exc.message}", hint=exc.hint) from None


def resolve_model(recipe: Recipe, workdir: Path):
    """Load the recipe's model: an ONNX path, or ``zoo:NAME`` exported into ``workdir``."""
    spec = recipe.model
    if spec.startswith("zoo:"):
        import carve.models as models

        out = workdir / f"{spec[4:]}.onnx"
        models.export(spec[4:], out)
        return load(out)
    return load(recipe.model_path())


def resume_dir(recipe: Recipe) -> Path:
    """Where a recipe run keeps each finished pass's model and result until the run is done: ``<output>.resume``."""
    return recipe.output.with_name(recipe.output.name + ".resume")


def _step_key(recipe: Recipe, original_digest: str, k: int) -> str:
    """What a finished pass's output depends on: the input model, the data, the seed and the passes up to it."""
    import hashlib
    import json

    spec = {"model": original_digest, "data": recipe.data, "seed": recipe.seed, "passes": recipe.passes[: k + 1]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def run_recipe(
    recipe: Recipe,
    *,
    keep_intermediate: Path | None = None,
    progress=None,
    command: str | None = None,
    steps_dir: Path | None = None,
    resume: bool = False,
):
    """Run every pass, evaluate, (optionally) benchmark, check thresholds. Returns (original, final model, report).

    With ``steps_dir`` each finished pass's model and result are written there (``01_prune.onnx`` and ``.json``) as
    soon as it finishes; with ``resume`` the passes whose outputs are there, made from the same model, data, seed and
    passes, are not run again: the run goes on from the last finished one. ``progress`` hears ``recipe: pass`` k of n
    (with the pass's name) before and after each pass, and the passes' own stages."""

    check_output_path(recipe.output, *recipe.inputs())
    with tempfile.TemporaryDirectory(prefix="carve-recipe-") as tmp:
        original = resolve_model(recipe, Path(tmp))
    pre = Preprocess.for_model(original)
    if recipe.data.get("mean") is not None:
        pre.mean = tuple(recipe.data["mean"])
    if recipe.data.get("std") is not None:
        pre.std = tuple(recipe.data["std"])
    data_source = recipe.data_source

    calib = None
    if data_source("calib") is not None:
        calib = load_data(
            data_source("calib"),
            model=original,
            preprocess=pre,
            samples=int(recipe.data.get("samples", 512)),
            seed=recipe.seed,
        )
    train = None
    if data_source("train") is not None:
        n = recipe.data.get("train_samples")
        train = load_data(data_source("train"), model=original, preprocess=pre, samples=n, seed=recipe.seed)
    ev = None
    if data_source("eval") is not None:
        n = recipe.data.get("eval_samples")
        ev = load_data(data_source("eval"), model=original, preprocess=pre, samples=n, seed=recipe.seed + 1)
    pass_objs = [build(name, **opts) for name, opts in recipe.passes]
    instruments = [NumericCheck(), Timing()]
    if keep_intermediate is not None:
        instruments.append(Dump(keep_intermediate))
    ctx = PassContext(
        calib=calib,
        train=train,
        eval=ev,
        original=original,
        workdir=recipe.output.parent / f"{recipe.output.stem}.steps",
        seed=recipe.seed,
        command=command,
        progress=progress,
    )
    final, results = _run_passes(recipe, pass_objs, instruments, original, ctx, steps_dir, resume)
    if not any(r.changed for r in results):
        check_runs(final)  # nothing changed, so nothing was checked: the file written must still run
    for p, r in zip(pass_objs, results):
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
    if ev is not None:
        if progress:
            progress("evaluate original and final")
        report["accuracy"] = {
            "original": evaluate(original, ev, progress=progress),
            "final": evaluate(final, ev, reference=original, progress=progress),
        }
    return original, final, report


def _run_passes(recipe, pass_objs, instruments, original, ctx, steps_dir: Path | None, resume: bool):
    """The passes one by one, each finished one kept in ``steps_dir`` (and taken from there with ``resume``)."""
    import hashlib
    import json

    from carve.pipeline.graph.io import atomic_write
    from carve.pipeline.passes import PassResult

    say = ctx.progress or (lambda *a, **k: None)
    digest = hashlib.sha256(original.proto.SerializeToString()).hexdigest() if steps_dir is not None else ""
    model, results, n = original, [], len(pass_objs)
    for k, p in enumerate(pass_objs):
        stem = steps_dir / f"{k + 1:02d}_{p.name}" if steps_dir is not None else None
        key = _step_key(recipe, digest, k) if stem is not None else None
        record_path = stem.with_suffix(".json") if stem is not None else None
        if resume and record_path is not None and record_path.is_file() and stem.with_suffix(".onnx").is_file():
            rec = json.loads(record_path.read_text())
            if rec.get("key") == key:
                model = load(stem.with_suffix(".onnx"))
                results.append(
                    PassResult(model, rec["changed"], rec["details"], rec["summary"], rec["seconds"], rec["error"])
                )
                say("recipe: pass", k + 1, n, name=p.name, resumed="finished before")
                continue
        say("recipe: pass", k, n, name=p.name)
        model, (result,) = PassManager([p], instruments).run(model, ctx)
        results.append(result)
        if stem is not None:
            stem.parent.mkdir(parents=True, exist_ok=True)
            save(model, stem.with_suffix(".onnx"))
            rec = {
                "key": key,
                "pass": p.name,
                "changed": result.changed,
                "details": result.details,
                "summary": result.summary,
                "seconds": result.seconds,
                "error": result.error,
            }
            with atomic_write(record_path) as f:
                json.dump(rec, f, indent=1, default=str)
        say("recipe: pass", k + 1, n, name=p.name, seconds=round(result.seconds, 1))
    return model, results


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
    "clock",
    "memory",
}


def bench_config(recipe: Recipe) -> MeasureConfig:
    """The recipe's ``bench`` section as a :class:`MeasureConfig`; refused when a threshold needs more rounds than
    it measures (the gate's minimum)."""
    cfg = from_mapping(
        MeasureConfig,
        recipe.bench,
        where=f"{recipe.path}: bench",
        only=BENCH_KEYS,
        defaults={"seed": recipe.seed, "agreement": False},
    )
    judged = {"max_slowdown", "min_speedup"} & set(recipe.thresholds)
    if judged and cfg.rounds < gate.MIN_ROUNDS:
        raise CarveError(
            f"{recipe.path}: bench: rounds {cfg.rounds} is too few for {sorted(judged)[0]}: the gate needs at least "
            f"{gate.MIN_ROUNDS} rounds to tell a slow-down from noise",
            hint=f"set bench: rounds: {gate.MIN_ROUNDS} or more",
        )
    return cfg


def bench_recipe(recipe: Recipe, original, final_path: Path, progress=None) -> dict:
    """Measure the original against the final model as the recipe's ``bench`` section says; the report's sections."""

    cfg = bench_config(recipe)
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
