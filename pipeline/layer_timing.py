"""Time two small models against each other, interleaved, for per-layer decisions (``merge --when slower``).

Sub-millisecond layers need many repetitions and the machines are noisy, so the models run in alternating rounds
(A B, B A, ...) after a warm-up, each round long enough to dwarf the timer, and the answer is the median of per-round
ratios: robust to a background process slowing one round. Whole-model benchmarks live in :mod:`pipeline.measure`.
"""

from __future__ import annotations

import time

import numpy as np
import onnx

from .errors import CarveError


def _runner(proto: onnx.ModelProto, backend: str, threads: int, batch: int):
    if backend != "ort":
        raise CarveError(f"per-layer timing supports the ort backend here; got {backend!r}")
    from .ortutil import random_feeds, session

    sess = session(proto, threads=threads)
    feeds = random_feeds(proto, batch=batch)
    return lambda: sess.run(None, feeds)


def time_ratio(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    *,
    backend: str = "ort",
    threads: int = 1,
    batch: int = 1,
    rounds: int = 15,
    min_round_s: float = 0.01,
) -> float:
    """Median over rounds of time(a) / time(b): above 1 means b is faster."""
    ra, rb = _runner(a, backend, threads, batch), _runner(b, backend, threads, batch)
    for f in (ra, rb):  # warm-up, and find how many calls fill a round
        f()
    t0 = time.perf_counter()
    ra()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(1, int(min_round_s / one))
    ratios = []
    for r in range(rounds):
        times = {}
        for name, f in (("a", ra), ("b", rb)) if r % 2 == 0 else (("b", rb), ("a", ra)):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            times[name] = time.perf_counter() - t0
        ratios.append(times["a"] / times["b"])
    return float(np.median(ratios))
