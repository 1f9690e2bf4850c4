"""What the benchmark scripts share: a one-thread ORT CPU speed-up of B against A, and writing a result document.

The scripts import this inside ``main`` (``tools/`` is on ``sys.path`` when a script runs), so
``tools/update_readme.py`` can load their ``markdown`` functions without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def speedups(a: Path, b: Path, batches: list[int], rounds: int) -> dict[str, dict]:
    """Per batch size: both medians and B's speed-up over A with its 95% CI (interleaved rounds, 1 thread)."""
    from pipeline.measure.compare import compare
    from pipeline.measure.config import MeasureConfig

    config = MeasureConfig(batch=batches, threads=[1], rounds=rounds, min_round_ms=50, memory=False, agreement=False)
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
