"""What the benchmark scripts share: a one-thread ORT CPU speed-up of B against A, the result document (what was
measured, where, how long it took) written atomically, and Markdown tables for the README.

``tools/`` is on ``sys.path`` when a script runs (and when ``tools/update_readme.py`` loads a script's ``markdown``);
the project itself is imported lazily.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def speedups(a: Path, b: Path, batches: list[int], rounds: int, clock: str = "wall") -> dict[str, dict]:
    """Per batch size: both medians and B's speed-up over A with its 95% CI (interleaved rounds, 1 thread; ``clock``
    as ``carve bench --clock``: the thread's CPU time is steadier on a shared machine)."""
    from carve.pipeline.measure.compare import compare
    from carve.pipeline.measure.config import MeasureConfig

    config = MeasureConfig(
        batch=batches, threads=[1], rounds=rounds, min_round_ms=50, memory=False, agreement=False, clock=clock
    )
    return {
        str(res["batch"]): {
            "a_ms": res["a"]["median_ms"],
            "b_ms": res["b"]["median_ms"],
            "speedup": res["speedup"]["median"],
            "ci": [res["speedup"]["ci_low"], res["speedup"]["ci_high"]],
        }
        for res in compare(a, b, config)["results"]
    }


def write(doc: dict, output: str | Path, markdown: Callable[[dict], str], show: bool) -> None:
    """Write ``doc`` as JSON (atomically) and print its Markdown table when asked."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    if show:
        print(markdown(doc))


def document(benchmark: str, started: float, **fields: Any) -> dict:
    """A benchmark's result document: its name, the machine (:func:`carve.pipeline.measure.environment.environment`),
    the wall time since ``started`` (``time.time()``), then the benchmark's own fields."""
    from carve.pipeline.measure.environment import environment

    return {"benchmark": benchmark, "environment": environment(), "seconds": round(time.time() - started), **fields}


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """A Markdown table as lines: one header row, the separator, one line per row (cells are str()-ed)."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
