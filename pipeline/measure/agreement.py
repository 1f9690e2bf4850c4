"""How closely two models' outputs agree on the same inputs (random by default, or samples of a data file), run on
the measured backend: the ``agreement`` section of a bench report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from carve.pipeline.data.datasets import load_data
from carve.pipeline.graph.io import load
from carve.pipeline.measure.backends import build
from carve.pipeline.measure.config import MeasureConfig
from carve.pipeline.runtime.ort import random_feeds
from carve.pipeline.runtime.verify import output_metrics


def agreement(a: Path, b: Path, cfg: MeasureConfig, batch: int) -> dict:
    """How closely the two models' outputs agree on the same inputs (first output; top-1 for classifiers)."""
    ma = load(a)
    ec = cfg.engine_config(batch, cfg.threads[0])
    ea, eb = build(cfg.backend, a, ec), build(cfg.backend, b, ec)
    xs, source = [], "random"
    if cfg.data:
        ds = load_data(cfg.data, model=ma, samples=cfg.agreement_samples, seed=cfg.seed)
        xs = [{ma.input_names[0]: x} for x, _ in ds.batches(batch)]
        source = cfg.data
    else:
        for k in range(max(1, cfg.agreement_samples // (batch * 8))):
            xs.append(random_feeds(ma, batch=batch, seed=cfg.seed + k))
    ya, yb = [], []
    for feeds in xs:
        if len(next(iter(feeds.values()))) != batch:
            continue  # engines are built for one batch size
        ya.append(np.asarray(ea.outputs(feeds)[0], dtype=np.float64))
        yb.append(np.asarray(eb.outputs(feeds)[0], dtype=np.float64))
    ea.close()
    eb.close()
    if not ya:
        return {"inputs": source, "samples": 0}
    x, y = np.concatenate(ya), np.concatenate(yb)
    if x.shape != y.shape:
        return {"inputs": source, "samples": int(len(x)), "error": f"output shapes differ: {x.shape} vs {y.shape}"}
    return {"inputs": source, "samples": int(len(x)), **output_metrics(x, y)}
