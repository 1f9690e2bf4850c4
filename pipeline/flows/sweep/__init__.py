"""Sweeps: a search over pruning settings from one YAML file, run by ``carve sweep SWEEP.yaml --out-dir DIR``.

    name: lenet-sweep
    model: zoo:lenet5              # an ONNX path (relative to this file) or zoo:NAME
    data:                          # as in a recipe (pipeline/flows/recipe.py)
      calib: digits:train
      eval: digits:test
      train: digits:train          # needed when a point fine-tunes
      samples: 256
    axes:                          # every combination is one point
      criterion: [l1, fpgm]
      allocator: [uniform]         # default [uniform]
      target: {kind: macs, values: [0.75, 0.5]}   # kind: macs | params | ratio (fraction removed per layer)
      repair: [none, lsq, lsq+bn, [{lsq: {ridge: 0.01}}, bn]]   # each value a repair list (registry names)
      finetune_epochs: [0, 1]      # 0: no fine-tuning; > 0 appends a `finetune` pass (distillation)
    prune: {round_to: 8}           # options every point's prune pass takes (not the axes)
    finetune: {batch: 32}          # options every fine-tuning point takes (not `epochs`)
    bench: {backend: ort, threads: 1, batch: [1], rounds: 10}   # required: each point is measured
    seed: 0

The package in four modules, one job each:

* :mod:`.schema`: the file, validated with the dataclasses recipes use (:func:`carve.pipeline.config.from_mapping`),
  and its expansion into :class:`Point` s;
* :mod:`.points`: a point as the recipe ``carve run`` would run (:func:`point_recipe`), built and timed, and its
  record;
* :mod:`.executor`: the local process pool, the machine-wide timing lock, resume, and the driver :func:`run_sweep`;
* :mod:`.results`: ``results.json`` (latency on a common footing, the Pareto front marked).

Each point is a recipe (:class:`carve.pipeline.flows.recipe.Recipe`) with the passes ``prune`` [+ ``finetune``], run by
:func:`carve.pipeline.flows.recipe.run_recipe` and measured by :func:`carve.pipeline.flows.recipe.bench_recipe` exactly
as ``carve run`` does. A point's record is written as soon as it finishes (``points/<id>.json``, atomically, next to its
model ``models/<id>.onnx``); ``results.json`` at the end holds every record with the Pareto-optimal ones marked. The
Ray executor is in :mod:`carve.pipeline.flows.sweep_ray`.
"""

from carve.pipeline.flows.sweep.executor import (
    LocalExecutor,
    done_records,
    from_threads,
    run_point,
    run_sweep,
    timing_lock,
)
from carve.pipeline.flows.sweep.points import (
    Built,
    build_point,
    config_hash,
    point_recipe,
    record_failed,
    record_ok,
    time_point,
)
from carve.pipeline.flows.sweep.results import accuracy_key, finish
from carve.pipeline.flows.sweep.schema import Point, Sweep, expand, load_sweep

__all__ = [
    "Built",
    "LocalExecutor",
    "Point",
    "Sweep",
    "accuracy_key",
    "build_point",
    "config_hash",
    "done_records",
    "expand",
    "finish",
    "from_threads",
    "load_sweep",
    "point_recipe",
    "record_failed",
    "record_ok",
    "run_point",
    "run_sweep",
    "time_point",
    "timing_lock",
]
